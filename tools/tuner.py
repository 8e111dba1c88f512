"""The tuning engine behind flashcore-tune: timing, checking, Optuna / grid studies, records.

Everything op-specific comes from the op's `flashcore.tuning.Tuning`; this module never names a kernel.

One study per (GPU, spec, bucket, op version, mode), persisted in Optuna storage (tune_storage.py: the CLI's
default is an SQLite file per GPU; a PostgreSQL server for workers on many hosts), so a killed run resumes and
several workers share it, none measuring a config another one measured or is measuring. Per study:

  1. the heuristic default (and any existing record's config) are enqueued first;
  2. the sampler (multivariate TPE over the categorical space) proposes configs in small batches; configs that
     fail static pruning are told PRUNED before anything compiles; a batch compiles in parallel threads
     (Triton's AsyncCompileMode), then each config is checked against a reference on fresh random inputs and
     timed; a compile error or a wrong answer fails that trial, never the run; a config proposed again is
     answered from the cache (no second measurement), and after repeated repeats the untried neighbour of
     the incumbent is enqueued (local search), so the evaluation budget is spent on new configs; configs that
     launch alike on the bucket's call (the op's `Tuning.launched_as`, e.g. a split count the heuristic would
     pick anyway) count as one config, measured once;
  3. the default and the best few are re-timed interleaved (A/B rounds) and the winner is recorded; the tuned
     config must beat the default by more than the noise margin or the default is recorded, so a record is
     never slower than the default;
  4. the record (config, latency, metric, default latency, trials, evaluations, provenance) is stored in the
     study and upserted into the tuning DB; every other process sharing the study copies it from there into its
     own tuning DB (reporting the bucket `cached`), so each worker's DB ends with every record of the plan.

Timing on a GPU: CUDA graphs of back-to-back launches rotating over input sets (enough sets to exceed 4x the L2
cache, so small problems are not timed warm; large ones use one set and exceed L2 anyway), warm-up replay, then
the median over timed replays. No host overhead is measured. Under the interpreter: wall-clock medians,
flagged timing_valid=0 (meaningless as performance numbers; they exercise the pipeline).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import statistics
import time
import traceback
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

from flashcore.generator import KernelSpec, source_hash
from flashcore.ops import get as get_op
from flashcore.tuning import Bucket, Config, Problem, Tuning
from flashcore.tuning_db import TuningDBError

from .tune_storage import FINAL, FREED, OWNER, RETRY_OF, brief, coordination, running_claims, this_process

NOISE_MARGIN = 0.01       # the tuned config must beat the default by more than this to replace it


# ---------------------------------------------------------------------------------------------- options

@dataclass
class TuneOptions:
    gpu: str
    interpret: bool = False
    trials: int = 16                 # distinct configs measured per bucket (the default included)
    timeout: float | None = None     # seconds per bucket
    grid: bool = False               # exhaustive: every feasible config
    batch: int = 4                   # configs proposed, compiled (in parallel) and then timed together
    startup: int = 5                 # proposals before TPE models the space (at least the initial design)
    compile_threads: int = 0         # 0: cpu_count
    verify_top: int = 2              # best configs re-timed against the default at the end
    verify_rounds: int = 3
    rep_ms: float = 10.0             # GPU work per timed graph replay
    replays: int = 5                 # timed replays per measurement in the study (the final A/B takes more)
    retune: bool = False
    seed: int = 0
    deadline: float | None = None    # time.time() after which no new study starts
    prior: tuple = ()                # Records (e.g. an older bundle) whose configs seed the matching studies

    @property
    def mode(self) -> str:
        """The kind of study and record: "grid" (exhaustive) or "optuna"."""
        return "grid" if self.grid else "optuna"

    def target(self, feasible: int) -> int:
        """Configs a bucket's study measures, of its `feasible` ones: all of them (grid), else up to `trials`."""
        return feasible if self.grid else min(self.trials, feasible)


@dataclass
class Eval:
    config: Config
    ms: float | None                 # None: failed
    reason: str = ""
    error: float = 0.0


@dataclass
class BucketResult:
    op: str
    spec: str
    bucket: tuple[int, ...]
    call: dict[str, Any]             # the op's call description, as a dict
    status: str                      # tuned | cached | failed | skipped
    default_config: Config = field(default_factory=dict)
    default_ms: float = 0.0
    config: Config = field(default_factory=dict)
    ms: float = 0.0
    metric: float = 0.0
    metric_unit: str = ""
    trials: int = 0
    evaluations: int = 0
    feasible: int = 0
    failures: int = 0
    wall_s: float = 0.0
    timing_valid: bool = True
    note: str = ""
    history: list[dict[str, Any]] = field(default_factory=list)    # evaluation order: config, ms

    @property
    def speedup(self) -> float:
        return self.default_ms / self.ms if self.ms > 0 and self.default_ms > 0 else 1.0

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["speedup"] = self.speedup
        return out


# ------------------------------------------------------------------------------------------------ timing

def _sync(device: str) -> None:
    if device != "cpu":
        import torch
        torch.cuda.synchronize()


def time_configs(problem: Problem, configs: Sequence[Config], opts: TuneOptions, rounds: int = 1,
                 replays: int | None = None) -> list[float]:
    """Median latency (ms) of each config, measured in interleaved rounds. Raises on a launch failure."""
    if problem.device == "cpu":
        samples = [[] for _ in configs]
        runs = [problem.runner(c) for c in configs]
        for run in runs:
            run(0)                                  # warm (loads the kernel)
        for _ in range(max(rounds, 1) * 2):
            for i, run in enumerate(runs):
                t0 = time.perf_counter()
                run(0)
                samples[i].append((time.perf_counter() - t0) * 1e3)
        return [statistics.median(s) for s in samples]
    return _time_cuda(problem, configs, opts, rounds, replays or opts.replays)


def _time_cuda(problem: Problem, configs: Sequence[Config], opts: TuneOptions, rounds: int,
               replays: int) -> list[float]:
    import torch
    n_sets = max(problem.n_sets, 1)
    stream = torch.cuda.Stream()
    graphs: list[tuple[Any, int] | None] = []
    fallback: list[Callable[[int], Any]] = []
    with torch.cuda.stream(stream):
        for config in configs:
            run = problem.runner(config)
            for i in range(n_sets):                 # warm: loads the kernel, touches every set
                run(i)
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for i in range(n_sets):
                run(i)
            end.record()
            torch.cuda.synchronize()
            estimate = max(start.elapsed_time(end) / n_sets, 1e-3)
            calls = int(min(1000, max(n_sets, math.ceil(opts.rep_ms / estimate))))
            calls = max(n_sets, calls // n_sets * n_sets)
            try:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, stream=stream):
                    for j in range(calls):
                        run(j % n_sets)
                graph.replay()
                torch.cuda.synchronize()
                graphs.append((graph, calls))
            except Exception:                        # not capturable: time launches with events instead
                torch.cuda.synchronize()
                graphs.append(None)
            fallback.append(run)
        samples: list[list[float]] = [[] for _ in configs]
        replays = max(replays, 3)
        # one warm round, then rounds of one replay per config (ABCABC...): slow clock drift hits all alike
        n_rounds = replays if len(configs) > 1 else 1
        per_round = 1 if len(configs) > 1 else replays
        for r in range(n_rounds + 1):
            for i, entry in enumerate(graphs):
                for _ in range(per_round if r else 1):
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    if entry is not None:
                        graph, calls = entry
                        start.record()
                        graph.replay()
                        end.record()
                    else:
                        calls = n_sets
                        start.record()
                        for j in range(calls):
                            fallback[i](j)
                        end.record()
                    end.synchronize()
                    if r:
                        samples[i].append(start.elapsed_time(end) / calls)
    del graphs
    return [statistics.median(s) for s in samples]


# --------------------------------------------------------------------------------------------- compiling

@contextlib.contextmanager
def quiet_stderr(enabled: bool = True):
    """Compile failures make MLIR print pipeline reproducers to fd 2; the trial's reason says what failed."""
    if not enabled or os.environ.get("FLASHCORE_TUNE_VERBOSE"):
        yield
        return
    import sys
    import tempfile
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)

@contextlib.contextmanager
def _compile_only():
    """kernel[grid](...) compiles without launching (Triton's warmup path)."""
    from triton.runtime.jit import JITFunction
    original = JITFunction.__getitem__
    JITFunction.__getitem__ = lambda self, grid: (lambda *a, **k: self.run(*a, grid=grid, warmup=True, **k))
    try:
        yield
    finally:
        JITFunction.__getitem__ = original


def compile_parallel(problem: Problem, configs: Sequence[Config], threads: int) -> None:
    """Compile `configs` for `problem` in parallel threads (best effort: errors surface when the config runs)."""
    if problem.device == "cpu" or threads <= 1 or len(configs) <= 1:
        return
    import triton
    if not hasattr(triton, "AsyncCompileMode"):
        return
    from concurrent.futures import ThreadPoolExecutor
    try:
        with quiet_stderr(), ThreadPoolExecutor(max_workers=min(threads, len(configs))) as pool:
            with triton.AsyncCompileMode(pool, ignore_errors=True):
                with _compile_only():
                    for config in configs:
                        try:
                            problem.runner(config)(0)
                        except Exception:
                            pass
    except Exception:
        pass


# ------------------------------------------------------------------------------------------- evaluation

def evaluate(problem: Problem, config: Config, opts: TuneOptions) -> Eval:
    """Check on fresh inputs, then time. Never raises."""
    try:
        with quiet_stderr(problem.device != "cpu"):
            check = problem.check(config)
            _sync(problem.device)
    except Exception as e:
        return Eval(config, None, f"compile/launch error: {type(e).__name__}: {brief(e)}")
    if not check.ok:
        return Eval(config, None, f"wrong answer: max error {check.error:.3g} > tolerance {check.tolerance:.3g} "
                                  f"({check.detail})", check.error)
    try:
        ms = time_configs(problem, [config], opts)[0]
    except Exception as e:
        return Eval(config, None, f"timing error: {type(e).__name__}: {brief(e)}", check.error)
    if not (ms > 0 and math.isfinite(ms)):
        return Eval(config, None, f"bad timing {ms}", check.error)
    return Eval(config, ms, "", check.error)


# ---------------------------------------------------------------------------------------------- studies

def study_name(gpu: str, spec: KernelSpec, bucket: Bucket, mode: str, kernel: str = "") -> str:
    """The bucket's study; `kernel`: the study of one kernel an op tunes before its last (Op.tuned_kernels; the
    last kernel's study is the bucket's own, which holds the record)."""
    name = f"{gpu}|{spec.key()}|{'x'.join(map(str, bucket))}|{get_op(spec.op).version_of(spec)}|{mode}"
    return f"{name}|{kernel}" if kernel else name


def study_names(tunable: Tuning, gpu: str, spec: KernelSpec, bucket: Bucket, mode: str) -> list[str]:
    """Every study of a bucket, in the order they run (one, or one per kernel an op tunes separately)."""
    stages = tunable.stages()
    return [study_name(gpu, spec, bucket, mode, kernel if i < len(stages) - 1 else "")
            for i, (kernel, _) in enumerate(stages)]


# Study user attributes: PLAN (op, spec, bucket, target: written by every run whose plan has the study, read by
# `flashcore-tune status`), STARTED (a process has begun it: other processes start elsewhere first) and RECORD
# (the record its final A/B made, JSON: every process that shares the study copies it into its own tuning DB).
PLAN, STARTED, RECORD = "plan", "started", "record"
CLAIM_POLL_S = 0.5        # how often a tuner waiting on another process's claim looks again


def register_plan(storage, items, opts: TuneOptions) -> None:
    """Create the studies of a plan [(tuning, spec, bucket)] and note in each what it is for (PLAN), so that
    `flashcore-tune status` knows every bucket of the plan, started or not, from any host. With --retune the
    studies are deleted first: call it once per run (the CLI's parent process), not in each worker."""
    import optuna
    if storage is None:
        return
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    for tunable, spec, bucket in items:
        name = study_name(opts.gpu, spec, bucket, opts.mode)
        if opts.retune:
            for old in study_names(tunable, opts.gpu, spec, bucket, opts.mode):
                with contextlib.suppress(KeyError):
                    optuna.delete_study(study_name=old, storage=storage)
        feasible = tunable.study_sizes(spec, bucket)[-1]      # the bucket's own study (the last kernel's)
        study = optuna.create_study(storage=storage, study_name=name, direction="minimize", load_if_exists=True)
        study.set_user_attr(PLAN, {"op": tunable.name, "spec": spec.key(), "bucket": list(bucket),
                                   "target": opts.target(feasible)})


def untouched_first(storage, names: Sequence[str]) -> int:
    """Which of the studies `names` (a worker's remaining share of the plan, in order) to tune next: the first
    that no process has started, else the first without a record (joining the processes measuring it). Workers on
    several hosts, each with the plan in the same order, so spread over the plan instead of crowding one study."""
    if storage is None or len(names) <= 1:
        return 0
    attrs = {s.study_name: s.user_attrs for s in storage.get_all_studies()}
    for wanted in (lambda a: STARTED not in a and RECORD not in a, lambda a: RECORD not in a):
        for i, name in enumerate(names):
            if wanted(attrs.get(name, {})):
                return i
    return 0


def _neighbours(config: Config, space: dict[str, list[int]]) -> list[Config]:
    out = []
    for name, choices in space.items():
        i = choices.index(config[name]) if config[name] in choices else -1
        for j in (i - 1, i + 1):
            if i >= 0 and 0 <= j < len(choices):
                out.append({**config, name: choices[j]})
    return out


def measured(trial) -> bool:
    """Whether `trial` holds a measurement of its config: told (COMPLETE, or FAIL with the reason), by a process
    that held its claim to the end (not freed)."""
    from optuna.trial import TrialState
    attrs = trial.user_attrs
    return bool(attrs.get("evaluated")) and FREED not in attrs and (
        trial.state == TrialState.COMPLETE or trial.state == TrialState.FAIL and "reason" in attrs)


class Study:
    """An Optuna study of one (spec, bucket), with the evaluation cache rebuilt from its trials.

    Processes sharing the study (tools/tune_storage.py) claim each config before measuring it, and the study's
    final A/B before it; a claim whose owner is gone is failed and its config enqueued again."""

    def __init__(self, tunable: Tuning, problem: Problem, bucket: Bucket, opts: TuneOptions, storage,
                 mode: str, seed_configs: Sequence[Config] = (), on_eval: Callable[[Eval], None] | None = None,
                 evaluator: Callable[[Config], Eval] | None = None,
                 compiler: Callable[[list[Config]], None] | None = None, kernel: str = ""):
        import warnings

        import optuna
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
        self.optuna = optuna
        self.tunable, self.problem, self.bucket, self.opts = tunable, problem, bucket, opts
        self.spec = problem.spec
        self.space = tunable.search_space(self.spec, bucket)
        # results, claims and the feasible set are keyed by the config as launched: alike launches measured once
        self.key = functools.partial(tunable.launch_key, self.spec, bucket)
        self.names = list(self.space)
        self.default = dict(tunable.op.default_config(self.spec))
        self.feasible = tunable.feasible_configs(self.spec, bucket)
        # each launched form's feasible config: what is measured and recorded for any config launching alike (the
        # sampler may propose one the op rejects, e.g. more splits than the bucket has key tiles, which a bundle
        # import would then drop)
        self.feasible_as = {self.key(c): c for c in self.feasible}
        self.on_eval = on_eval
        threads = opts.compile_threads or os.cpu_count() or 1
        self.evaluator = evaluator or (lambda config: evaluate(problem, config, opts))
        self.compiler = compiler or (lambda configs: compile_parallel(problem, configs, threads))
        self.name = study_name(opts.gpu, self.spec, bucket, mode, kernel)
        self.earlier: list[Study] = []            # the studies of the kernels tuned before this one's
        seeds = [self.default, *seed_configs]
        if tunable.initial_configs is not None and mode != "grid":
            seeds += tunable.initial_configs(self.spec, bucket)
        self.seeds: list[Config] = []
        for config in seeds:
            feasible = self.feasible_as.get(self.key(config))
            if feasible is not None and feasible not in self.seeds:
                self.seeds.append(feasible)
        seed = (opts.seed * 1_000_003 + int(_source_hash(tunable, self.spec)[:8], 16) + sum(bucket)) % (2 ** 31)
        sampler = optuna.samplers.TPESampler(multivariate=True, constant_liar=True, seed=seed,
                                             n_startup_trials=max(1, opts.startup, len(self.seeds)))
        self.storage = storage if storage is not None else optuna.storages.InMemoryStorage()
        self.coord = coordination(self.storage)
        self.me = this_process()
        self.study = optuna.create_study(storage=self.storage, study_name=self.name, direction="minimize",
                                         sampler=sampler, load_if_exists=True)
        self.study_id = self.storage.get_study_id_from_name(self.name)
        self.results: dict[tuple, Eval] = {}
        self.history: list[Eval] = []
        self.claims: dict[tuple, str] = {}        # configs other live processes are measuring -> their owner
        self.finalizer: str | None = None         # another live process running the final A/B
        self.stale: list[Any] = []                # trials claimed by processes that are gone
        self.waiting: set[tuple] = set()          # configs enqueued, not asked yet
        self.held: dict[int, int] = {}            # trial number -> id of this process's claims
        self.final_number: int | None = None      # this process's final A/B claim
        self.trials = 0
        with self.exclusive():
            self._reload()
            if not self.study.trials:
                for config in self.seeds:
                    self.study.enqueue_trial(self._params(config), skip_if_exists=True)

    def exclusive(self):
        """Held while asking for and claiming a config or the final A/B: every process sharing the study waits
        (Optuna's own hand-out of enqueued trials is not atomic on SQLite, and the claim check is ours)."""
        return self.coord.exclusive(self.name)

    def _params(self, config: Config) -> dict[str, int]:
        return {n: config[n] for n in self.names}

    def _reload(self) -> None:
        TS = self.optuna.trial.TrialState
        trials = self.study.get_trials(deepcopy=False)
        live, self.stale = running_claims(self.storage, self.study_id, trials, self.me)
        # outside the lock every RUNNING trial is a claim (see _ask): one without an owner, seen holding the lock,
        # belongs to a process that died asking for it
        self.stale += [t for t in trials if t.state == TS.RUNNING and OWNER not in t.user_attrs]
        # configs enqueued and not yet asked (Optuna keeps an enqueued trial's config in its fixed_params)
        self.waiting = {self.key({n: int(v) for n, v in t.system_attrs["fixed_params"].items()})
                        for t in trials if t.state == TS.WAITING and "fixed_params" in t.system_attrs}
        self.claims, self.finalizer = {}, None
        for t in live:
            if t.user_attrs.get(FINAL):
                self.finalizer = t.user_attrs[OWNER]
            else:
                self.claims[self.key({n: int(t.params[n]) for n in self.names})] = t.user_attrs[OWNER]
        self.trials = 0
        for t in trials:
            if t.user_attrs.get(FINAL):
                continue
            self.trials += 1
            if not measured(t):
                continue
            config = {n: int(t.params[n]) for n in self.names if n in t.params}
            key = self.key(config)
            if key in self.results:
                continue
            if t.state == TS.COMPLETE:
                ev = Eval(config, float(t.value), "", float(t.user_attrs.get("error", 0.0)))
            else:
                ev = Eval(config, None, str(t.user_attrs["reason"]))
            self.results[key] = ev
            self.history.append(ev)

    def _free_stale(self) -> None:
        """Reload; free the claims of processes that are gone (marked, then failed) and enqueue their configs
        again, so that whoever asks next measures them (a final A/B claim is just freed). Call it holding the
        lock."""
        self._reload()
        if not self.stale:
            return
        for t in self.stale:
            trial_id = self.storage.get_trial_id_from_study_id_trial_number(self.study_id, t.number)
            try:
                # marked first: its owner may have died after writing part of a measurement, which is void
                self.storage.set_trial_user_attr(trial_id, FREED, self.me)
                self.storage.set_trial_state_values(trial_id, self.optuna.trial.TrialState.FAIL)
            except self.optuna.exceptions.UpdateFinishedTrialError:
                continue                                    # its owner finished it after all
            if OWNER in t.user_attrs and not t.user_attrs.get(FINAL):     # a config's claim: measure it again
                self.study.enqueue_trial({n: int(t.params[n]) for n in self.names}, user_attrs={RETRY_OF: t.number})
        self._reload()

    def free_stale(self) -> None:
        with self.exclusive():
            self._free_stale()

    def _hold(self, number: int) -> None:
        trial_id = self.storage.get_trial_id_from_study_id_trial_number(self.study_id, number)
        self.coord.hold(self.storage, trial_id)
        self.held[number] = trial_id

    def _release(self, number: int) -> None:
        trial_id = self.held.pop(number, None)
        if trial_id is not None:
            self.coord.release(trial_id)

    @property
    def evaluations(self) -> int:
        return len(self.results)

    def all_studies(self) -> list["Study"]:
        """The bucket's studies so far: the earlier kernels' and this one."""
        return [*self.earlier, self]

    def best(self, n: int = 1) -> list[Eval]:
        ok = sorted((e for e in self.results.values() if e.ms is not None), key=lambda e: e.ms)
        return ok[:n]

    def _tell_cached(self, trial, ev: Eval) -> None:
        TS = self.optuna.trial.TrialState
        trial.set_user_attr("cached", True)
        if ev.ms is None:
            self.study.tell(trial, state=TS.PRUNED)       # a known failure: steer the sampler away from it
        else:
            self.study.tell(trial, ev.ms)

    def _record(self, trial, ev: Eval) -> None:
        TS = self.optuna.trial.TrialState
        try:
            trial.set_user_attr("evaluated", True)
            trial.set_user_attr("error", ev.error)
            if ev.ms is None:
                trial.set_user_attr("reason", ev.reason[:500])
                self.study.tell(trial, state=TS.FAIL)
            else:
                self.study.tell(trial, ev.ms)
        except self.optuna.exceptions.UpdateFinishedTrialError:
            # no heartbeat reached the server for the grace period: another process took the claim over and
            # measures the config again; this measurement is dropped so that the study holds one per config
            return
        finally:
            self._release(trial.number)
        self.results[self.key(ev.config)] = ev
        self.history.append(ev)
        if self.on_eval:
            self.on_eval(ev)

    def _ask(self, target: int, in_batch: set[tuple]):
        """Ask for a config and claim it if nobody measured or is measuring it, as one step across the processes
        sharing the study: (trial, config, claimed), or None when other processes' claims fill the target. A
        config not claimed is told at once (measured: its result; being measured: pruned; infeasible: pruned),
        so that outside the lock every RUNNING trial of the study is a claim."""
        TS = self.optuna.trial.TrialState
        with self.exclusive():
            self._free_stale()
            if self.evaluations + len(self.claims) + len(in_batch) >= target:
                return None
            trial = self.study.ask()
            config = {n: int(trial.suggest_categorical(n, self.space[n])) for n in self.names}
            key = self.key(config)
            config = self.feasible_as.get(key, config)
            claimed = key in self.feasible_as and key not in self.results and key not in self.claims \
                and key not in in_batch
            if claimed:
                self._hold(trial.number)       # heartbeat first: a claim is never seen without one
                trial.set_user_attr(OWNER, self.me)
            elif key in self.results:
                self._tell_cached(trial, self.results[key])
            elif key in self.feasible_as:    # being measured, in this batch or by another process
                trial.set_user_attr("cached", True)
                self.study.tell(trial, state=TS.PRUNED)
            else:
                reason = self.tunable.op.check_config(self.spec, config, self.bucket) or "outside the space"
                trial.set_user_attr("infeasible", reason)
                self.study.tell(trial, state=TS.PRUNED)
            return trial, config, claimed

    def run(self, target: int, grid: bool = False) -> None:
        opts = self.opts
        start = time.time()
        target = min(target, len(self.feasible))
        max_asks = 8 * target + 64
        asks = repeats = 0
        first = True
        while asks < max_asks:
            self._reload()                 # other workers may share this study
            if self.evaluations >= target:
                break
            if opts.timeout and time.time() - start > opts.timeout:
                break
            free = target - self.evaluations - len(self.claims)
            if free <= 0 or self.feasible_as.keys() <= self.results.keys() | self.claims.keys():
                if not self.claims:
                    break                  # every feasible config is measured
                time.sleep(CLAIM_POLL_S)   # the rest is being measured by other processes: wait for it
                continue
            want = max(1, opts.batch)
            if first and not grid:
                want = max(want, len(self.seeds) - self.evaluations)   # the initial design compiles at once
            first = False
            want = min(want, free)
            if grid:
                # feasible configs nobody measured, is measuring or has enqueued, in order (whatever a dead
                # process was asking for or measuring comes back here or through its retry)
                taken = self.results.keys() | self.claims.keys() | self.waiting
                for config in [c for c in self.feasible if self.key(c) not in taken][:want]:
                    self.study.enqueue_trial(self._params(config))
            batch: list[tuple[Any, Config]] = []
            in_batch: set[tuple] = set()
            while len(batch) < want and asks < max_asks:
                asked = self._ask(target, in_batch)
                if asked is None:
                    break
                trial, config, claimed = asked
                asks += 1
                self.trials += 1
                key = self.key(config)
                if claimed:
                    repeats = 0
                    batch.append((trial, config))
                    in_batch.add(key)
                elif key in self.results:          # proposed again: answered from the cache
                    repeats += 1
                    if repeats >= 2 and not grid:
                        self._enqueue_neighbour()
                        repeats = 0
            if not batch:
                continue
            self.compiler([c for _, c in batch])
            for trial, config in batch:
                self._record(trial, self.evaluator(config))
        # trials left RUNNING (timeout mid-batch cannot happen: every asked trial is told)

    def claim_final(self, finished: Callable[[], Any]) -> Any:
        """Before the final A/B and record: wait for other processes' measurements of this study and for any
        other final A/B of it, then claim it. None once claimed; or what finished() returns when not None: the
        record another process made of it."""
        while True:
            with self.exclusive():
                self._free_stale()
                if not self.claims and self.finalizer is None:
                    done = finished()
                    if done is not None:
                        return done
                    # a claim without a config; its owner attribute comes after the heartbeat, as in _ask
                    template = self.optuna.trial.create_trial(state=self.optuna.trial.TrialState.RUNNING,
                                                              user_attrs={FINAL: True})
                    trial_id = self.storage.create_new_trial(self.study_id, template_trial=template)
                    number = self.storage.get_trial_number_from_id(trial_id)
                    self._hold(number)
                    self.storage.set_trial_user_attr(trial_id, OWNER, self.me)
                    self.final_number = number
                    return None
            time.sleep(CLAIM_POLL_S)

    def release_final(self) -> None:
        number = self.final_number
        trial_id = self.held.get(number)
        self._release(number)
        with contextlib.suppress(self.optuna.exceptions.UpdateFinishedTrialError):   # taken over as stale
            self.storage.set_trial_state_values(trial_id, self.optuna.trial.TrialState.FAIL)

    def shared_record(self):
        """The record the study's final A/B made (by any process sharing it), or None."""
        from flashcore.tuning_db import Record
        obj = self.study.user_attrs.get(RECORD)
        return Record.from_json(obj) if obj else None

    def publish(self, record) -> None:
        self.study.set_user_attr(RECORD, record.to_json())

    def mark_started(self) -> None:
        if STARTED not in self.study.user_attrs:
            self.study.set_user_attr(STARTED, self.me)

    def _enqueue_neighbour(self) -> None:
        """The sampler keeps proposing measured configs: try the untried neighbour of the best ones."""
        for ev in self.best(3):
            for config in _neighbours(ev.config, self.space):
                key = self.key(config)
                if key in self.feasible_as and key not in self.results:
                    self.study.enqueue_trial(self._params(config))
                    return
        untried = [c for c in self.feasible if self.key(c) not in self.results]
        if untried:
            self.study.enqueue_trial(self._params(untried[0]))

# ---------------------------------------------------------------------------------------------- buckets

def tune_bucket(tunable: Tuning, spec: KernelSpec, bucket: Bucket, opts: TuneOptions, storage, db=None,
                device: str = "cuda", log: Callable[[str], None] = print,
                on_eval: Callable[[Eval], None] | None = None) -> BucketResult:
    """Tune one (spec, bucket); write the record to `db` (a TuningDB) if given. Never raises."""
    t0 = time.time()
    call = tunable.call_of_bucket(spec, bucket)
    result = BucketResult(tunable.name, spec.key(), tuple(bucket), dataclasses.asdict(call), "failed",
                          timing_valid=not opts.interpret)
    try:
        problem = tunable.make_problem(spec, call, device)
    except Exception as e:
        result.note = f"could not build the problem: {type(e).__name__}: {brief(e)}"
        log(f"  {result.note}")
        return result
    try:
        return _tune_problem(tunable, problem, bucket, opts, storage, db, result, t0, log, on_eval)
    except TuningDBError as e:                  # the DB refused the record: one line, no traceback
        result.status, result.note = "failed", f"record not written: {e}"
        log(f"  {result.note}")
        return result
    except Exception as e:
        result.note = f"{type(e).__name__}: {brief(e)}"
        log(f"  bucket failed: {result.note}\n{traceback.format_exc(limit=4)}")
        return result
    finally:
        del problem
        if device != "cpu":
            import torch
            torch.cuda.empty_cache()


def _tune_problem(tunable, problem: Problem, bucket, opts: TuneOptions, storage, db, result: BucketResult,
                  t0: float, log, on_eval) -> BucketResult:
    spec = problem.spec
    result.spec = spec.key()
    result.metric_unit = problem.metric_unit
    thash = tunable.op.version_of(spec)
    existing = db.get(opts.gpu, spec.key(), thash, bucket) if db is not None else None
    mode = opts.mode
    result.default_config = dict(tunable.op.default_config(spec))
    # in memory no study remembers the bucket, the DB's record does: one that covers the whole plan of studies is
    # the answer, and nothing is measured (not even the studies of an op's earlier kernels, which _last_study runs)
    if storage is None and existing is not None:
        sizes = tunable.study_sizes(spec, bucket)
        if _covers(existing, opts, sum(map(opts.target, sizes)), shared=False):
            result.feasible = sum(sizes)
            return _cached(result, existing, None)
    seeds = [existing.config] if existing is not None and existing.config else []
    seeds += prior_configs(tunable, spec, bucket, opts.prior, opts.gpu)
    study = _last_study(tunable, problem, bucket, opts, storage, mode, seeds, on_eval)
    result.feasible = sum(len(s.feasible) for s in study.all_studies())
    target = opts.target(len(study.feasible))

    def covers(record, shared: bool) -> bool:
        return _covers(record, opts, study.evaluations, shared)

    def finished():
        """The bucket's record if one covers the study: the study's (made by whichever process finished it, and
        copied into this DB), else this DB's (then shared through the study, so that every process agrees)."""
        shared = study.shared_record()
        if covers(shared, shared=True):
            if db is not None and db.get(opts.gpu, spec.key(), thash, bucket) != shared:
                db.put(shared)
            return shared
        record = db.get(opts.gpu, spec.key(), thash, bucket) if db is not None else None
        if not covers(record, shared=False):
            return None
        study.publish(record)
        return record

    if study.evaluations >= target and (record := finished()) is not None:
        study.free_stale()                      # e.g. the final A/B claim of a process killed after recording
        return _cached(result, record, study)
    study.mark_started()
    study.run(target, grid=opts.grid)

    record = study.claim_final(finished)
    if record is not None:                      # another process finished the bucket meanwhile
        return _cached(result, record, study)
    try:
        return _final_ab(problem, study, opts, db, result, t0, log, mode, thash)
    finally:
        study.release_final()


def _covers(record, opts: TuneOptions, evaluations: int, shared: bool) -> bool:
    """The record was made from every one of `evaluations` measurements (a study's, by this run, an earlier or a
    concurrent one) in this tuner mode. With --retune the studies were started over: only a record made since (a
    `shared` one, the study's own) counts."""
    return (record is not None and (shared or not opts.retune) and record.tuner == opts.mode
            and record.evaluations >= evaluations)


def _last_study(tunable: Tuning, problem: Problem, bucket: Bucket, opts: TuneOptions, storage, mode: str,
                seeds: list[Config], on_eval) -> Study:
    """The bucket's study, not yet run. An op that tunes its kernels separately (Op.tuned_kernels) gets one study
    per kernel: each earlier kernel's runs here, its tunables searched with the later kernels' at their values in
    the default, and its best config held fixed in the studies after it; the last kernel's study is returned (its
    `earlier` lists the others). Seeds (an earlier record, the prior bundle) enter each study with that study's
    tunables only."""
    stages = tunable.stages()
    if len(stages) == 1:
        return Study(tunable, problem, bucket, opts, storage, mode, seeds, on_eval)
    base, earlier = dict(tunable.op.default_config(problem.spec)), []
    for i, (kernel, names) in enumerate(stages):
        last = i == len(stages) - 1
        view = tunable.stage_view(names, base)
        study = Study(view, problem, bucket, opts, storage, mode, [view.project(c, names, base) for c in seeds],
                      on_eval, kernel="" if last else kernel)
        if last:
            study.earlier = earlier
            return study
        study.run(opts.target(len(study.feasible)), grid=opts.grid)
        best = study.best(1)
        if best:
            base = view.project(best[0].config, names, base)
        earlier.append(study)
    raise AssertionError("unreachable: an op has at least one stage")


def prior_configs(tunable: Tuning, spec: KernelSpec, bucket: Bucket, records, gpu: str) -> list[Config]:
    """Configs of earlier records for this GPU, op and bucket whose spec this one extends (same values for every
    feature the record names; a feature added since takes its default), e.g. the shipped bundle of the previous
    op version: after a template edit a retune starts from what won before instead of rediscovering it. Tunables
    added since take the default's value; configs the op no longer accepts are dropped."""
    features, default, out = spec.as_dict(), tunable.op.default_config(spec), []
    for r in records:
        if r.gpu != gpu or r.template != tunable.name or tuple(r.bucket) != tuple(bucket):
            continue
        old = {k: v for k, v in json.loads(r.spec).items() if k not in ("op", "template")}
        config = {**default, **r.config}
        if all(features.get(k) == v for k, v in old.items()) and tunable.op.check_config(spec, config, bucket) is None:
            out.append(config)
    return out


def _cached(result: BucketResult, record, study: Study | None) -> BucketResult:
    result.status = "cached"
    result.config, result.ms, result.default_ms = dict(record.config), record.latency_ms, record.default_ms
    result.metric, result.trials, result.evaluations = record.metric, record.trials, record.evaluations
    result.wall_s = record.wall_s
    result.history = [{"config": e.config, "ms": e.ms} for e in study.history] if study is not None else []
    return result


def _final_ab(problem: Problem, study: Study, opts: TuneOptions, db, result: BucketResult, t0: float, log, mode: str,
              thash: str) -> BucketResult:
    """The op's default and the study's best few re-timed interleaved; the winner recorded. (With a study per
    kernel: the last kernel's best few, each holding the earlier kernels' best.)"""
    from flashcore.tuning_db import Record, provenance
    spec = problem.spec
    studies = study.all_studies()
    result.trials, result.evaluations = sum(s.trials for s in studies), sum(s.evaluations for s in studies)
    result.failures = sum(1 for s in studies for e in s.results.values() if e.ms is None)
    result.history = [{"config": e.config, "ms": e.ms, "reason": e.reason} for s in studies for e in s.history]
    default = dict(result.default_config)
    default_ev = next((s.results[s.key(default)] for s in studies if s.key(default) in s.results), None)
    best = study.best(opts.verify_top)
    if not best:
        result.note = "no config ran correctly" + (f" (default: {default_ev.reason})" if default_ev else "")
        log(f"  {result.note}")
        return result
    # A/B: the default and the best few, interleaved rounds, same conditions
    candidates = [default] + [e.config for e in best if study.key(e.config) != study.key(default)]
    default_ok = default_ev is None or default_ev.ms is not None
    if not default_ok:
        candidates = candidates[1:]
    times = time_configs(problem, candidates, opts, rounds=opts.verify_rounds, replays=4 * opts.verify_rounds)
    if default_ok:
        default_ms = times[0]
        i_best = min(range(len(candidates)), key=lambda i: times[i])
        if i_best != 0 and times[i_best] > default_ms * (1 - NOISE_MARGIN):
            i_best = 0          # within noise of the default: keep the default
    else:
        default_ms = 0.0
        i_best = min(range(len(candidates)), key=lambda i: times[i])
        result.note = f"default failed: {default_ev.reason}"
    result.config, result.ms, result.default_ms = dict(candidates[i_best]), times[i_best], default_ms
    result.metric = problem.metric(result.ms)
    result.wall_s = time.time() - t0
    record = Record(gpu=opts.gpu, template=spec.op, template_hash=thash, spec=spec.key(), bucket=tuple(study.bucket),
                    config=result.config, latency_ms=result.ms, metric=result.metric, metric_unit=problem.metric_unit,
                    default_config=result.default_config, default_ms=result.default_ms, trials=result.trials,
                    evaluations=result.evaluations, tuner=mode, timing_valid=not opts.interpret, wall_s=result.wall_s,
                    source_hash=_source_hash(study.tunable, spec), **provenance(_gpu_full_name(problem.device)))
    if db is not None:
        db.put(record)                          # validates it
    study.publish(record)                       # for the other processes sharing the study, and their DBs
    result.status = "tuned"                     # only now: the summary counts no record the DB does not hold
    return result


def _source_hash(tunable: Tuning, spec: KernelSpec) -> str:
    """Hash of every kernel source the op renders for `spec` (provenance of a record)."""
    return "+".join(source_hash(spec, t) for t in tunable.op.kernels)


def _gpu_full_name(device: str) -> str:
    if device == "cpu":
        return "Triton interpreter (CPU)"
    import torch
    return torch.cuda.get_device_name()
