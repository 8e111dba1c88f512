"""flashcore-tune: tune FlashCore kernels on this GPU, and manage tuning DBs and bundles.

    flashcore-tune [run] [--gpu auto|h100|...] [--kernels attn_fwd] [--dtypes bf16,fp16] [--head-dims 64,128]
                   [--feature causal=false,true] [--buckets 4096x4096x64,...] [--trials 16] [--timeout S]
                   [--budget S] [--grid] [--dry-run] [--storage URL] [--devices 0,1] [--interpret]
                   [--db PATH] [--report PATH]
    flashcore-tune export  [--db PATH] [--gpu h100] [-o tuning_db/bundles/h100.json]
    flashcore-tune import  BUNDLE... [--db PATH]
    flashcore-tune merge   BUNDLE... -o OUT
    flashcore-tune heldout [plan options] [--report PATH]      default vs dispatch's choice on untuned shapes
    flashcore-tune compare [plan options] [--fraction 0.3] [--report PATH]   Optuna vs exhaustive grid
    flashcore-tune show    [--db PATH]                          records in a DB
    flashcore-tune prune   [--db PATH]                          delete records of old template versions

`run` tunes every (spec, bucket) of the plan: the cartesian product of the template's feature axes (dtypes,
head dims, --feature NAME=V1,V2) with its default shape buckets (or --buckets). Results go to the tuning DB
(--db, default $FLASHCORE_TUNING_DB or ~/.cache/flashcore/tuning.db), which dispatch reads at runtime; studies
persist in --storage (default: a journal file in ~/.cache/flashcore/tune/), so re-running the same command
resumes an interrupted run. --interpret runs the whole pipeline on the CPU through the Triton interpreter with
tiny shapes (timings meaningless, flagged as such in the records).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

SUBCOMMANDS = ("run", "export", "import", "merge", "heldout", "compare", "show", "prune")
from flashcore.tunable import GPU_ARCH  # noqa: E402

# Cost model of --dry-run (seconds per compile / evaluation / bucket), H100 + Triton 3.6.
# Fitted to an H100 run of 18 buckets (6 specs, 16 configs each): 131 s measured, 139 s estimated.
COST = {"gpu": {"compile": 0.3, "eval": 0.2, "verify": 0.8, "problem": 0.3},
        "interpreter": {"compile": 0.0, "eval": 0.35, "verify": 0.5, "problem": 0.05}}


def _csv(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _value(text: str):
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    try:
        return int(text)
    except ValueError:
        return text


# ------------------------------------------------------------------------------------------------- args

def _plan_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gpu", default="auto", help="GPU the records are for: auto (detected), h100, h200, a100, ...")
    p.add_argument("--force", action="store_true", help="record for --gpu even if another GPU is present")
    p.add_argument("--kernels", default=None, help="templates to tune, comma separated (default: all registered)")
    p.add_argument("--dtypes", default=None, help="e.g. bf16,fp16 (default: the template's plan)")
    p.add_argument("--head-dims", default=None, help="e.g. 64,128,256 (default: the template's plan)")
    p.add_argument("--feature", action="append", default=[], metavar="NAME=V1,V2",
                   help="sweep a feature axis, e.g. causal=false,true or gqa_group=1,8 (repeatable)")
    p.add_argument("--buckets", default=None, help="shape buckets instead of the plan's, e.g. 4096x4096x64,1024x1024x256")
    p.add_argument("--interpret", action="store_true",
                   help="CPU pipeline through the Triton interpreter, tiny shapes, meaningless timings")
    p.add_argument("--db", default=None, help="tuning DB file (default: $FLASHCORE_TUNING_DB or the user cache)")
    p.add_argument("--report", default=None, help="write a report: FILE.md, FILE.json, or a directory (both)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _tuning_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trials", type=int, default=16, help="distinct configs measured per bucket (default 16)")
    p.add_argument("--timeout", type=float, default=None, help="seconds per bucket")
    p.add_argument("--batch", type=int, default=4, help="configs proposed and compiled in parallel per step")
    p.add_argument("--compile-threads", type=int, default=0, help="parallel compile threads (default: CPU count)")
    p.add_argument("--rep-ms", type=float, default=10.0, help="GPU time per timed CUDA-graph replay (ms)")
    p.add_argument("--replays", type=int, default=5, help="timed replays per measurement (median)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flashcore-tune", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")

    p = sub.add_parser("run", help="tune the plan (the default command)")
    _plan_args(p)
    _tuning_args(p)
    p.add_argument("--grid", action="store_true", help="exhaustive: measure every feasible config of each bucket")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds for the whole run: no bucket starts after it (re-run to resume)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and an estimate of its cost")
    p.add_argument("--storage", default=None,
                   help="Optuna storage: a journal file path (default ~/.cache/flashcore/tune/<gpu>.journal), "
                        "an RDB URL (sqlite:///..., postgresql://...), or 'memory'")
    p.add_argument("--devices", default=None,
                   help="worker processes sharing the studies and DB: a count N (the first N GPUs), GPU "
                        "indices '0,1' ('3,' for GPU 3 alone), or 'all'; with --interpret, N CPU workers")
    p.add_argument("--retune", action="store_true", help="start the studies over (ignore stored trials)")

    p = sub.add_parser("export", help="DB records -> a reviewable JSON bundle per GPU")
    p.add_argument("--db", default=None)
    p.add_argument("--gpu", default=None, help="GPU to export (default: every GPU in the DB, one file each)")
    p.add_argument("-o", "--out", default=None, help="bundle file, or a directory for <gpu>.json (default: .)")
    p.add_argument("--include-stale", action="store_true", help="also records of old template versions")

    p = sub.add_parser("import", help="bundles -> DB records (keeps the faster record of a key)")
    p.add_argument("bundles", nargs="+")
    p.add_argument("--db", default=None)
    p.add_argument("--prefer", choices=("fastest", "newest"), default="fastest")

    p = sub.add_parser("merge", help="several bundles of one GPU -> one bundle")
    p.add_argument("bundles", nargs="+")
    p.add_argument("-o", "--out", required=True)
    p.add_argument("--prefer", choices=("fastest", "newest"), default="fastest")

    p = sub.add_parser("heldout", help="default vs dispatch's choice on shapes between the plan's buckets")
    _plan_args(p)
    _tuning_args(p)
    p.add_argument("--shapes", default=None,
                   help="extra shapes: batch:seqlen_q:seqlen_k:heads_q, comma separated (e.g. 3:1536:1536:32)")
    p.add_argument("--with-plan-buckets", action="store_true",
                   help="also re-measure the plan's own bucket shapes (tuned vs default, independently of the run)")

    p = sub.add_parser("compare", help="Optuna vs an exhaustive grid of the same space, per bucket")
    _plan_args(p)
    _tuning_args(p)
    p.add_argument("--fraction", type=float, default=0.3,
                   help="Optuna's evaluation budget as a fraction of the grid's (default 0.3)")
    p.add_argument("--replay-seeds", type=int, default=20,
                   help="also replay the sampler on the grid's measurements with this many seeds")

    p = sub.add_parser("show", help="list the records of a DB")
    p.add_argument("--db", default=None)
    p.add_argument("--gpu", default=None)

    p = sub.add_parser("prune", help="delete records of templates that changed since")
    p.add_argument("--db", default=None)
    return parser


def parse_args(argv: Sequence[str] | None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in SUBCOMMANDS and argv[0] not in ("-h", "--help"):
        argv = ["run"] + argv
    return build_parser().parse_args(argv)


# ------------------------------------------------------------------------------------------------ setup

def _db_path(args) -> Path:
    from flashcore.tuning_db import user_cache_root, user_db_path
    if getattr(args, "db", None):
        return Path(args.db).expanduser()
    return user_db_path() or user_cache_root() / "tuning.db"


def _detect_gpu(interpret: bool) -> tuple[str, int, str]:
    """(gpu name, arch, device) of what is present."""
    if interpret:
        return "interpreter", 0, "cpu"
    import torch
    from flashcore.device import arch, gpu_name
    if not torch.cuda.is_available():
        return "none", 0, "cpu"
    return gpu_name(0), arch(0), "cuda"


class UsageError(Exception):
    pass


def _setup(args) -> dict[str, Any]:
    """Resolve GPU, arch and the plan. Sets TRITON_INTERPRET for --interpret before any kernel loads."""
    if args.interpret:
        os.environ["TRITON_INTERPRET"] = "1"
    present, arch, device = _detect_gpu(args.interpret)
    gpu = present if args.gpu in (None, "auto") else args.gpu.lower()
    dry = getattr(args, "dry_run", False)
    if args.interpret and gpu != "interpreter" and not args.force:
        raise UsageError(f"--interpret records results for GPU 'interpreter', not {gpu!r} (timings on the CPU "
                         "interpreter say nothing about a GPU); drop --gpu or pass --force")
    if not args.interpret:
        if present == "none" and not dry:
            raise UsageError("no CUDA GPU found: tune on the GPU that will serve, or use --interpret (CPU) or "
                             "--dry-run")
        if gpu != present and not args.force and not dry:
            raise UsageError(f"--gpu {gpu} but this machine has {present!r}: records would claim timings of a GPU "
                             "that was not measured. Run on that GPU, or pass --force")
        if gpu != present:
            if gpu not in GPU_ARCH:
                raise UsageError(f"unknown GPU {gpu!r} for planning; known: {', '.join(sorted(GPU_ARCH))}")
            arch = GPU_ARCH[gpu]
    plan = make_plan(args, arch)
    return {"gpu": gpu, "present": present, "arch": arch, "device": device, "plan": plan}


def make_plan(args, arch: int) -> list[tuple[Any, Any, tuple[int, ...]]]:
    """[(tunable, spec, bucket)] from the CLI options."""
    from flashcore import tunable as tunables
    kernels = _csv(args.kernels) if args.kernels else tunables.names()
    plan = []
    for name in kernels:
        try:
            t = tunables.get(name)
        except KeyError as e:
            raise UsageError(str(e)) from e
        axes: dict[str, list] = {}
        if args.dtypes:
            axes["dtype"] = _csv(args.dtypes)
        if args.head_dims:
            axes["head_dim"] = [int(x) for x in _csv(args.head_dims)]
        for item in args.feature:
            fname, _, values = item.partition("=")
            if not values:
                raise UsageError(f"--feature {item!r}: expected NAME=V1,V2")
            axes[fname.strip()] = [_value(v) for v in _csv(values)]
        buckets = [t.parse_bucket(b) for b in _csv(args.buckets)] if args.buckets else None
        try:
            items = t.plan(arch, args.interpret, axes, buckets)
        except TypeError as e:
            raise UsageError(f"{name}: {e}") from e
        plan.extend((t, spec, bucket) for spec, bucket in items)
    return plan


def _options(args, gpu: str, deadline: float | None = None):
    from .tuner import TuneOptions
    interpret = args.interpret
    return TuneOptions(gpu=gpu, interpret=interpret, trials=args.trials, timeout=args.timeout,
                       grid=getattr(args, "grid", False), batch=1 if interpret else args.batch,
                       startup=3 if interpret else 5, compile_threads=args.compile_threads,
                       verify_rounds=1 if interpret else 3, rep_ms=args.rep_ms, replays=args.replays,
                       retune=getattr(args, "retune", False), seed=args.seed, deadline=deadline)


def _storage_url(args, gpu: str) -> str:
    if args.storage:
        return args.storage
    from flashcore.tuning_db import user_cache_root
    return str(user_cache_root() / "tune" / f"{gpu}.journal")


def short_spec(spec_key: str) -> str:
    fields = json.loads(spec_key)
    parts = []
    for name in ("dtype", "head_dim"):
        if name in fields:
            parts.append(f"d{fields[name]}" if name == "head_dim" else str(fields[name]))
    for name, value in sorted(fields.items()):
        if name in ("template", "dtype", "head_dim", "arch"):
            continue
        if isinstance(value, bool):
            if value:
                parts.append(name)
        elif name == "gqa_group":
            if value != 1:
                parts.append(f"gqa{value}")
        else:
            parts.append(f"{name}={value}")
    return " ".join(parts)


def short_config(config: dict[str, int]) -> str:
    return "/".join(str(v) for v in config.values()) if config else "-"


def short_bucket(bucket) -> str:
    return "x".join(str(x) for x in bucket)


# ------------------------------------------------------------------------------------------- progress

class Progress:
    def __init__(self, total: int, quiet: bool = False):
        self.quiet = quiet
        self.bar = self.inner = None
        self.total = total
        self.done = 0
        try:
            if not quiet:
                from tqdm import tqdm
                self.tqdm = tqdm
                self.bar = tqdm(total=total, desc="buckets", unit="bucket", position=0, dynamic_ncols=True,
                                mininterval=0.5)
        except ImportError:
            self.tqdm = None

    def start(self, label: str, target: int) -> None:
        if self.bar is not None:
            if self.inner is not None:
                self.inner.close()
            self.inner = self.tqdm(total=target, desc=f"  {label}"[:60], unit="cfg", position=1, leave=False,
                                   dynamic_ncols=True, mininterval=0.5)
        elif not self.quiet:
            print(f"[{self.done + 1}/{self.total}] {label} ...", flush=True)

    def step(self, ok: bool) -> None:
        if self.inner is not None:
            self.inner.update(1)

    def finish(self, line: str) -> None:
        self.done += 1
        if self.bar is not None:
            if self.inner is not None:
                self.inner.close()
                self.inner = None
            self.bar.update(1)
            self.bar.write(line)
        elif not self.quiet:
            print(line, flush=True)

    def write(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line)
        elif not self.quiet:
            print(line, flush=True)

    def close(self) -> None:
        if self.inner is not None:
            self.inner.close()
        if self.bar is not None:
            self.bar.close()


def _result_line(r) -> str:
    if r.status in ("tuned", "cached"):
        return (f"  {r.template} {short_spec(r.spec)} {short_bucket(r.bucket)}: default {short_config(r.default_config)}"
                f" {r.default_ms:.4g} ms -> {short_config(r.config)} {r.ms:.4g} ms ({r.speedup:.2f}x, "
                f"{r.metric:.1f} {r.metric_unit}; {r.evaluations}/{r.feasible} configs, {r.wall_s:.0f}s)"
                + (" [cached]" if r.status == "cached" else ""))
    return f"  {r.template} {short_spec(r.spec)} {short_bucket(r.bucket)}: {r.status} {r.note}"


# ------------------------------------------------------------------------------------------------ run

def _worker_items(n_items: int, worker: int, workers: int) -> list[int]:
    """Own share first (round robin), then everyone else's: a worker that runs out joins studies in progress."""
    own = list(range(worker, n_items, workers))
    return own + [i for i in range(n_items) if i % workers != worker]


def run_items(items, opts, db_path: str, storage_url: str, device: str, emit, worker: int = 0,
              workers: int = 1) -> list:
    """Tune the plan items in order (a worker's share first); emit(event, payload) reports progress."""
    from flashcore.tuning_db import TuningDB
    from .tuner import make_storage, tune_bucket
    storage = make_storage(storage_url)
    db = TuningDB(db_path)
    results = []
    for index in _worker_items(len(items), worker, workers):
        tunable, spec, bucket = items[index]
        if opts.deadline and time.time() > opts.deadline:
            emit("budget", {"index": index})
            break
        target = opts.trials if not opts.grid else len(tunable.feasible_configs(spec, bucket))
        emit("start", {"index": index, "label": f"{tunable.template} {short_spec(spec.key())} {short_bucket(bucket)}",
                       "target": min(target, len(tunable.feasible_configs(spec, bucket)))})
        result = tune_bucket(tunable, spec, bucket, opts, storage, db, device,
                             log=lambda line: emit("log", {"line": line}),
                             on_eval=lambda ev: emit("eval", {"ok": ev.ms is not None}))
        results.append((index, result))
        emit("done", {"index": index, "result": result})
    db.close()
    return results


def _worker_main(worker: int, workers: int, device_index: str, args_dict: dict, gpu: str, db_path: str,
                 storage_url: str, deadline: float | None, queue) -> None:
    """A worker process: one GPU (or one CPU interpreter), the shared storage and DB."""
    if device_index != "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = device_index
    args = argparse.Namespace(**args_dict)
    if args.interpret:
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        setup = _setup(argparse.Namespace(**{**args_dict, "gpu": gpu, "force": True}))
        opts = _options(args, gpu, deadline)

        def emit(event, payload):
            if event == "done":
                payload = {"index": payload["index"], "result": payload["result"].to_json()}
            queue.put((worker, event, payload))
        run_items(setup["plan"], opts, db_path, storage_url, setup["device"], emit, worker, workers)
    except Exception as e:
        import traceback
        queue.put((worker, "log", {"line": f"worker {worker} failed: {e}\n{traceback.format_exc()}"}))
    finally:
        queue.put((worker, "exit", {}))


def _devices(spec: str | None, interpret: bool) -> list[str]:
    if spec is None:
        return []
    if interpret:
        n = int(spec) if spec.isdigit() else len(_csv(spec))
        return ["cpu"] * max(n, 1)
    import torch
    if spec == "all":
        return [str(i) for i in range(torch.cuda.device_count())]
    if spec.isdigit():                         # a count: the first N GPUs
        return [str(i) for i in range(max(1, int(spec)))]
    return _csv(spec)                          # indices: "0,1" (one GPU by index: "3,")


def cmd_run(args) -> int:
    setup = _setup(args)
    gpu, plan = setup["gpu"], setup["plan"]
    if not plan:
        print("flashcore-tune: empty plan")
        return 1
    if args.dry_run:
        print_plan(plan, args, setup)
        return 0
    from .tuner import BucketResult
    db_path = str(_db_path(args))
    storage_url = _storage_url(args, gpu)
    deadline = time.time() + args.budget if args.budget else None
    t0 = time.time()
    devices = _devices(args.devices, args.interpret)
    print(f"flashcore-tune: {len(plan)} buckets on {gpu} ({setup['device']}"
          f"{', ' + str(len(devices)) + ' workers' if len(devices) > 1 else ''}); DB {db_path}; studies {storage_url}"
          + ("; INTERPRETER: timings are meaningless" if args.interpret else ""), flush=True)
    progress = Progress(len(plan), args.quiet)
    results: dict[int, Any] = {}

    def handle(worker, event, payload):
        if event == "start":
            progress.start(payload["label"], payload["target"])
        elif event == "eval":
            progress.step(payload["ok"])
        elif event == "done":
            r = payload["result"]
            if isinstance(r, dict):
                r = BucketResult(**{k: v for k, v in r.items() if k != "speedup"})
            if payload["index"] not in results or results[payload["index"]].status not in ("tuned",):
                results[payload["index"]] = r
                progress.finish(_result_line(r))
        elif event == "log":
            progress.write(payload["line"])
        elif event == "budget":
            progress.write(f"  --budget reached: stopping (re-run the same command to resume)")

    try:
        if len(devices) <= 1:
            if devices and devices[0] != "cpu":
                import torch
                torch.cuda.set_device(int(devices[0]))
            run_items(plan, _options(args, gpu, deadline), db_path, storage_url, setup["device"],
                      lambda e, p: handle(0, e, p))
        else:
            _run_workers(args, devices, gpu, db_path, storage_url, deadline, handle)
    finally:
        progress.close()
    rows = [results[i] for i in sorted(results)]
    wall = time.time() - t0
    print_table(rows, args.interpret)
    summary = summarize(rows, wall, gpu, args.interpret)
    print(summary["text"])
    if args.report:
        write_report(args.report, "tune", tune_markdown(rows, summary, plan_title(args, gpu)),
                     {"gpu": gpu, "summary": summary, "buckets": [r.to_json() for r in rows]})
    done = [r for r in rows if r.status in ("tuned", "cached")]
    if len(rows) < len(plan):
        print(f"{len(plan) - len(rows)} buckets not started (--budget): run the same command again to resume")
    return 0 if done or not rows else 1


def _run_workers(args, devices, gpu, db_path, storage_url, deadline, handle) -> None:
    import multiprocessing as mp
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    args_dict = vars(args).copy()
    # every worker loads every study from the shared storage: make sure it exists before they start
    from .tuner import make_storage
    make_storage(storage_url)
    procs = [ctx.Process(target=_worker_main, args=(w, len(devices), dev, args_dict, gpu, db_path, storage_url,
                                                     deadline, queue), daemon=False)
             for w, dev in enumerate(devices)]
    for p in procs:
        p.start()
    alive = len(procs)
    import queue as queue_mod
    while alive:
        try:
            worker, event, payload = queue.get(timeout=1.0)
        except queue_mod.Empty:
            if not any(p.is_alive() for p in procs):
                break
            continue
        if event == "exit":
            alive -= 1
            continue
        handle(worker, event, payload)
    for p in procs:
        p.join()


def plan_title(args, gpu: str) -> str:
    return f"flashcore-tune on {gpu}" + (" (Triton interpreter: timings meaningless)" if args.interpret else "")


def print_plan(plan, args, setup) -> None:
    gpu = setup["gpu"]
    interpret = args.interpret
    cost = COST["interpreter" if interpret else "gpu"]
    rows, per_spec = [], {}
    total_evals = 0
    for t, spec, bucket in plan:
        feasible = len(t.feasible_configs(spec, bucket))
        target = feasible if args.grid else min(args.trials, feasible)
        total_evals += target
        rows.append((t.template, short_spec(spec.key()), short_bucket(bucket), feasible, target))
        acc = per_spec.setdefault(spec.key(), [0, feasible])
        acc[0] += target
        acc[1] = max(acc[1], feasible)
    print(f"plan for {gpu} (sm{setup['arch']}): {len(plan)} buckets, {len(per_spec)} kernel specs")
    print(f"{'template':10} {'spec':34} {'bucket':20} {'feasible':>8} {'evals':>6}")
    for row in rows:
        print(f"{row[0]:10} {row[1]:34} {row[2]:20} {row[3]:>8} {row[4]:>6}")
    # configs compile once per spec (buckets share kernels), in parallel threads; the initial design repeats
    unique = sum(min(f, math.ceil(e * (1.0 if args.grid else 0.7))) for e, f in per_spec.values())
    compile_s = unique * cost["compile"]
    eval_s = total_evals * cost["eval"]
    verify_s = len(plan) * (cost["verify"] + cost["problem"])
    total = compile_s + eval_s + verify_s
    workers = max(1, len(_devices(args.devices, interpret)) if args.devices else 1)
    print(f"estimate: {total_evals} evaluations, ~{unique} compiles; compile {compile_s:.0f}s + timing/checks "
          f"{eval_s:.0f}s + final A/B {verify_s:.0f}s = ~{total / 60:.1f} min"
          + (f" on 1 device, ~{total / workers / 60:.1f} min on {workers}" if workers > 1 else "")
          + " (a resumed run skips finished buckets)")


# ------------------------------------------------------------------------------------------- reports

def geomean(values: Sequence[float]) -> float:
    values = [v for v in values if v > 0]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


def summarize(rows, wall: float, gpu: str, interpret: bool) -> dict[str, Any]:
    tuned = [r for r in rows if r.status in ("tuned", "cached") and r.default_ms > 0]
    speedups = [r.speedup for r in tuned]
    slower = [r for r in tuned if r.ms > r.default_ms * 1.0000001]
    failed = [r for r in rows if r.status == "failed"]
    summary = {"gpu": gpu, "buckets": len(rows), "tuned": len(tuned), "failed": len(failed),
               "geomean_speedup": geomean(speedups), "min_speedup": min(speedups) if speedups else float("nan"),
               "max_speedup": max(speedups) if speedups else float("nan"), "slower_than_default": len(slower),
               "wall_s": wall, "timing_valid": not interpret,
               "evaluations": sum(r.evaluations for r in rows), "trials": sum(r.trials for r in rows)}
    summary["text"] = (f"{len(tuned)}/{len(rows)} buckets tuned, {len(failed)} failed; geomean speedup over the "
                       f"default {summary['geomean_speedup']:.3f}x (min {summary['min_speedup']:.3f}x, max "
                       f"{summary['max_speedup']:.3f}x); {summary['evaluations']} configs measured; wall "
                       f"{wall:.0f}s" + ("  [interpreter: timings meaningless]" if interpret else ""))
    return summary


def print_table(rows, interpret: bool) -> None:
    if not rows:
        return
    header = f"{'template':9} {'spec':30} {'bucket':18} {'default':14} {'ms':>9} {'tuned':14} {'ms':>9} {'speedup':>7} {'evals':>7} {'wall s':>6}"
    print("\n" + header + "\n" + "-" * len(header))
    for r in rows:
        print(f"{r.template:9} {short_spec(r.spec)[:30]:30} {short_bucket(r.bucket):18} "
              f"{short_config(r.default_config):14} {r.default_ms:9.4g} {short_config(r.config):14} {r.ms:9.4g} "
              f"{r.speedup:7.3f} {str(r.evaluations) + '/' + str(r.feasible):>7} {r.wall_s:6.0f}"
              + ("" if r.status in ("tuned",) else f"  {r.status} {r.note}"))
    keys = next((list(r.default_config) for r in rows if r.default_config), [])
    if keys:
        print("configs: " + "/".join(keys))


def tune_markdown(rows, summary, title: str) -> str:
    keys = next((list(r.default_config) for r in rows if r.default_config), [])
    lines = [f"# {title}", "", summary["text"], "", f"Configs are {'/'.join(keys)}. Latencies are medians (ms).", "",
             "| template | spec | bucket | default | default ms | tuned | tuned ms | speedup | metric | evals / feasible "
             "| trials | wall s | status |",
             "| --- | --- | --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        lines.append(f"| {r.template} | {short_spec(r.spec)} | {short_bucket(r.bucket)} | {short_config(r.default_config)} "
                     f"| {r.default_ms:.4g} | {short_config(r.config)} | {r.ms:.4g} | {r.speedup:.3f} | "
                     f"{r.metric:.1f} {r.metric_unit} | {r.evaluations}/{r.feasible} | {r.trials} | {r.wall_s:.1f} | "
                     f"{r.status}{' ' + r.note if r.note else ''} |")
    return "\n".join(lines) + "\n"


def write_report(path: str, kind: str, markdown: str, data: dict[str, Any]) -> list[Path]:
    target = Path(path)
    data = json.loads(json.dumps(data, default=str))
    written = []
    if target.suffix in (".md", ".json"):
        target.parent.mkdir(parents=True, exist_ok=True)
        stem = target.with_suffix("")
        outs = [(stem.with_suffix(".md"), markdown), (stem.with_suffix(".json"), json.dumps(data, indent=1))]
    else:
        target.mkdir(parents=True, exist_ok=True)
        outs = [(target / f"{kind}.md", markdown), (target / f"{kind}.json", json.dumps(data, indent=1))]
    for p, text in outs:
        p.write_text(text)
        written.append(p)
    print("report: " + ", ".join(str(p) for p in written))
    return written


# --------------------------------------------------------------------------------- export/import/merge

def cmd_export(args) -> int:
    from flashcore.generator import template_hash
    from flashcore.tuning_db import TuningDB, make_bundle, write_bundle
    db_path = _db_path(args)
    if not db_path.exists():
        print(f"flashcore-tune export: no DB at {db_path}", file=sys.stderr)
        return 1
    with TuningDB(db_path, readonly=True) as db:
        records = db.records(gpu=args.gpu) if args.gpu else db.records()
    if not args.include_stale:
        current = {}
        kept = []
        for r in records:
            if r.template not in current:
                try:
                    current[r.template] = template_hash(r.template)
                except OSError:
                    current[r.template] = None
            if r.template_hash == current[r.template]:
                kept.append(r)
        if len(kept) < len(records):
            print(f"skipping {len(records) - len(kept)} records of old template versions (--include-stale keeps them)")
        records = kept
    gpus = sorted({r.gpu for r in records}) or ([args.gpu] if args.gpu else [])
    if not gpus:
        print("flashcore-tune export: no records", file=sys.stderr)
        return 1
    out = Path(args.out) if args.out else Path(".")
    if len(gpus) > 1 and out.suffix == ".json":
        print(f"flashcore-tune export: records of several GPUs {gpus}: give --gpu, or a directory for -o",
              file=sys.stderr)
        return 1
    for gpu in gpus:
        bundle = make_bundle(gpu, [r for r in records if r.gpu == gpu], sources=[str(db_path)])
        path = out if out.suffix == ".json" else out / f"{gpu}.json"
        write_bundle(bundle, path)
        print(f"exported {len(bundle['records'])} {gpu} records to {path}")
    return 0


def cmd_import(args) -> int:
    from flashcore.tuning_db import BundleError, TuningDB, merge_records, read_bundle
    db_path = _db_path(args)
    total = 0
    with TuningDB(db_path) as db:
        for path in args.bundles:
            try:
                _, records = read_bundle(path)
            except BundleError as e:
                print(f"flashcore-tune import: {e}", file=sys.stderr)
                return 1
            existing = {}
            for r in records:
                old = db.get(r.gpu, r.spec, r.template_hash, r.bucket)
                if old is not None:
                    existing[r.key] = old
            merged = merge_records([existing.values(), records], args.prefer)
            changed = [r for r in merged if r.key not in existing or existing[r.key] is not r]
            db.put_many(changed)
            total += len(changed)
            print(f"imported {len(changed)} of {len(records)} records from {path} into {db_path}")
    return 0


def cmd_merge(args) -> int:
    from flashcore.tuning_db import BundleError, merge_bundles, write_bundle
    try:
        bundle = merge_bundles(args.bundles, args.prefer)
    except BundleError as e:
        print(f"flashcore-tune merge: {e}", file=sys.stderr)
        return 1
    write_bundle(bundle, args.out)
    print(f"merged {len(args.bundles)} bundles: {len(bundle['records'])} {bundle['gpu']} records -> {args.out}")
    return 0


def cmd_show(args) -> int:
    from flashcore.generator import template_hash
    from flashcore.tuning_db import TuningDB
    db_path = _db_path(args)
    if not db_path.exists():
        print(f"no DB at {db_path}")
        return 1
    with TuningDB(db_path, readonly=True) as db:
        records = db.records(gpu=args.gpu)
    print(f"{db_path}: {len(records)} records")
    for r in records:
        try:
            stale = r.template_hash != template_hash(r.template)
        except OSError:
            stale = True
        print(f"  {r.gpu:11} {r.template:9} {short_spec(r.spec):32} {short_bucket(r.bucket):18} "
              f"{short_config(r.config):14} {r.latency_ms:9.4g} ms  {r.speedup:.3f}x vs default  {r.tuner}"
              + ("  [stale template]" if stale else "") + ("" if r.timing_valid else "  [interpreter]"))
    return 0


def cmd_prune(args) -> int:
    from flashcore.generator import template_hash
    from flashcore.tuning_db import TuningDB
    with TuningDB(_db_path(args)) as db:
        templates = {r.template for r in db.records()}
        current = {}
        for t in templates:
            try:
                current[t] = template_hash(t)
            except OSError:
                current[t] = ""
        removed = db.prune_stale(current)
    print(f"removed {removed} stale records")
    return 0


# -------------------------------------------------------------------------------------------- heldout

def _parse_shapes(text: str | None) -> list[tuple[int, int, int, int]]:
    out = []
    for item in _csv(text or ""):
        parts = [int(x) for x in item.split(":")]
        if len(parts) != 4:
            raise UsageError(f"--shapes {item!r}: expected batch:seqlen_q:seqlen_k:heads_q")
        out.append(tuple(parts))
    return out


def cmd_heldout(args) -> int:
    """Default vs the config dispatch would choose (user DB / bundle / nearest bucket) on untuned shapes."""
    setup = _setup(args)
    if args.db:
        os.environ["FLASHCORE_TUNING_DB"] = str(Path(args.db).expanduser())
    from flashcore import dispatch
    from flashcore.tunable import config_key
    from .tuner import time_configs
    dispatch.clear()
    opts = _options(args, setup["gpu"])
    specs, plan_buckets = [], {}
    for t, spec, bucket in setup["plan"]:
        if (t, spec) not in specs:
            specs.append((t, spec))
        plan_buckets.setdefault(spec.key(), []).append(bucket)
    extra = _parse_shapes(args.shapes)
    rows = []
    t0 = time.time()
    progress = Progress(sum(len(t.heldout_descs(s, plan_buckets[s.key()])) + len(extra)
                            + (len(plan_buckets[s.key()]) if args.with_plan_buckets else 0) for t, s in specs),
                        args.quiet)
    for t, spec in specs:
        descs = t.heldout_descs(spec, plan_buckets[spec.key()])
        if args.with_plan_buckets:
            descs = [t.desc_for(spec, b) for b in plan_buckets[spec.key()]] + descs
        for batch, sq, sk, hq in extra:
            base = t.desc_for(spec, plan_buckets[spec.key()][0])
            descs.append({**base, "batch": batch, "seqlen_q": sq, "seqlen_k": sk, "heads_q": hq,
                          "heads_kv": max(1, hq // spec["gqa_group"])})
        for desc in descs:
            label = f"{short_spec(spec.key())} {desc['batch']}x{desc['seqlen_q']}x{desc['seqlen_k']}x{desc['heads_q']}"
            progress.start(label, 1)
            row = {"template": t.template, "spec": spec.key(), "desc": desc, "bucket": list(t.bucket_of(desc)),
                   "kind": "plan bucket" if tuple(t.bucket_of(desc)) in plan_buckets[spec.key()]
                   and desc == t.desc_for(spec, tuple(t.bucket_of(desc))) else "held-out"}
            try:
                problem = t.make_problem(spec, desc, setup["device"])
                default = dict(t.default_config(problem.spec))
                choice = dispatch.explain(problem.spec, tuple(t.bucket_of(desc)),
                                          t.runtime_default or t.default_config, gpu=setup["gpu"])
                row.update(default_config=default, config=choice.config, source=choice.source,
                           record_bucket=list(choice.bucket) if choice.bucket else None, origin=choice.origin)
                if config_key(choice.config) == config_key(default):
                    ms = time_configs(problem, [default], opts, rounds=opts.verify_rounds,
                                      replays=3 * opts.verify_rounds)
                    row.update(default_ms=ms[0], ms=ms[0])
                else:
                    check = problem.check(choice.config)
                    if not check.ok:
                        row["note"] = f"chosen config wrong: error {check.error:.3g} > {check.tolerance:.3g}"
                    ms = time_configs(problem, [default, choice.config], opts, rounds=opts.verify_rounds,
                                      replays=3 * opts.verify_rounds)
                    row.update(default_ms=ms[0], ms=ms[1])
                row["speedup"] = row["default_ms"] / row["ms"]
                row["metric"] = problem.metric(row["ms"])
                del problem
            except Exception as e:
                row.update(error=f"{type(e).__name__}: {e}")
            rows.append(row)
            line = (f"  {label}: {row.get('source', 'error')} {short_config(row.get('config', {}))} "
                    f"{row.get('ms', float('nan')):.4g} ms vs default {row.get('default_ms', float('nan')):.4g} ms "
                    f"({row.get('speedup', float('nan')):.3f}x)" + (f" {row['error']}" if "error" in row else ""))
            progress.finish(line)
    progress.close()
    def stats(kind):
        chosen = [r for r in rows if "speedup" in r and r["kind"] == kind]
        speedups = [r["speedup"] for r in chosen]
        return {"shapes": len(chosen), "geomean_speedup": geomean(speedups),
                "geomean_speedup_where_tuned": geomean([r["speedup"] for r in chosen if r["source"] != "default"]),
                "min_speedup": min(speedups, default=float("nan")),
                "slower_than_default": sum(1 for x in speedups if x < 1 - 0.02)}
    summary = {"gpu": setup["gpu"], "held_out": stats("held-out"), "plan_buckets": stats("plan bucket"),
               "errors": sum(1 for r in rows if "error" in r), "wall_s": time.time() - t0,
               "timing_valid": not args.interpret}
    h = summary["held_out"]
    text = (f"held-out: {h['shapes']} shapes, geomean speedup of dispatch's choice over the default "
            f"{h['geomean_speedup']:.3f}x ({h['geomean_speedup_where_tuned']:.3f}x where a record was used), min "
            f"{h['min_speedup']:.3f}x, {h['slower_than_default']} more than 2% slower")
    if args.with_plan_buckets:
        p = summary["plan_buckets"]
        text += (f"\nplan buckets re-measured: {p['shapes']} shapes, geomean {p['geomean_speedup']:.3f}x, min "
                 f"{p['min_speedup']:.3f}x, {p['slower_than_default']} more than 2% slower")
    print(text)
    if args.report:
        lines = [f"# Held-out shapes: {plan_title(args, setup['gpu'])}", "", text, "",
                 "| spec | shape (B x Sq x Sk x Hq) | kind | bucket | source | record bucket | default | default ms | "
                 "chosen | chosen ms | speedup | metric |",
                 "| --- | --- | --- | --- | --- | --- | --- | ---: | --- | ---: | ---: | ---: |"]
        for r in rows:
            d = r["desc"]
            lines.append(f"| {short_spec(r['spec'])} | {d['batch']}x{d['seqlen_q']}x{d['seqlen_k']}x{d['heads_q']} | "
                         f"{r['kind']} | {short_bucket(r['bucket'])} | {r.get('source', 'error')} | "
                         f"{short_bucket(r['record_bucket']) if r.get('record_bucket') else '-'} | "
                         f"{short_config(r.get('default_config', {}))} | {r.get('default_ms', float('nan')):.4g} | "
                         f"{short_config(r.get('config', {}))} | {r.get('ms', float('nan')):.4g} | "
                         f"{r.get('speedup', float('nan')):.3f} | {r.get('metric', 0):.1f} |")
        write_report(args.report, "heldout", "\n".join(lines) + "\n", {"summary": summary, "shapes": rows})
    return 0


# -------------------------------------------------------------------------------------------- compare

def cmd_compare(args) -> int:
    """Per bucket: exhaustive grid vs an Optuna study with fraction x the grid's evaluations."""
    import dataclasses
    setup = _setup(args)
    from flashcore.tunable import config_key
    from .tuner import Study, compile_parallel, evaluate, time_configs
    opts = _options(args, setup["gpu"])
    rows = []
    t_all = time.time()
    for t, spec, bucket in setup["plan"]:
        label = f"{t.template} {short_spec(spec.key())} {short_bucket(bucket)}"
        print(f"{label}:", flush=True)
        problem = t.make_problem(spec, t.desc_for(spec, bucket), setup["device"])
        feasible = t.feasible_configs(problem.spec, bucket)
        # grid: every feasible config, compiled in parallel chunks, measured once each
        t0 = time.time()
        table: dict[tuple, float | None] = {}
        reasons: dict[tuple, str] = {}
        chunk = max(8, (opts.compile_threads or os.cpu_count() or 8))
        for i in range(0, len(feasible), chunk):
            part = feasible[i:i + chunk]
            compile_parallel(problem, part, opts.compile_threads or os.cpu_count() or 1)
            for config in part:
                ev = evaluate(problem, config, opts)
                table[config_key(config)] = ev.ms
                if ev.ms is None:
                    reasons[config_key(config)] = ev.reason
        grid_wall = time.time() - t0
        ok = {k: v for k, v in table.items() if v is not None}
        if not ok:
            print("  no config ran")
            continue
        grid_best_key = min(ok, key=ok.get)
        by_key = {config_key(c): c for c in feasible}
        # optuna: a fresh in-memory study with the budget
        budget = max(2, int(args.fraction * len(feasible)))
        t0 = time.time()
        study = Study(t, problem, bucket, dataclasses.replace(opts, retune=True), None, "compare")
        study.run(budget)
        optuna_wall = time.time() - t0
        best = study.best(1)[0]
        # head to head, interleaved: grid's best, Optuna's best, default
        default = dict(t.default_config(problem.spec))
        grid_best = dict(by_key[grid_best_key])
        heads = [grid_best, best.config, default]
        unique = list({config_key(c): c for c in heads}.values())     # the same config is timed once
        measured = time_configs(problem, unique, opts, rounds=opts.verify_rounds, replays=4 * opts.verify_rounds)
        times = [measured[[config_key(u) for u in unique].index(config_key(c))] for c in heads]
        # evaluations Optuna needed to come within 3% of the grid's best (by the grid's measurements)
        within = next((i + 1 for i, ev in enumerate(study.history)
                       if ev.ms is not None and ok.get(config_key(ev.config), math.inf) <= 1.03 * ok[grid_best_key]),
                      None)
        replay = replay_sampler(t, problem.spec, bucket, table, budget, args.replay_seeds, opts) \
            if args.replay_seeds else {}
        row = {"template": t.template, "spec": problem.spec.key(), "bucket": list(bucket),
               "feasible": len(feasible), "grid_evaluations": len(table), "grid_failures": len(table) - len(ok),
               "grid_best_config": grid_best, "grid_best_ms_in_grid": ok[grid_best_key], "grid_wall_s": grid_wall,
               "optuna_evaluations": study.evaluations, "optuna_trials": study.trials,
               "optuna_best_config": best.config, "optuna_best_ms_in_study": best.ms, "optuna_wall_s": optuna_wall,
               "evaluation_fraction": study.evaluations / max(len(table), 1),
               "head_to_head_ms": {"grid_best": times[0], "optuna_best": times[1], "default": times[2]},
               "optuna_vs_grid": times[1] / times[0], "default_vs_grid": times[2] / times[0],
               "optuna_within_3pct_after": within,
               "optuna_rank_in_grid": 1 + sum(1 for v in ok.values() if v < ok.get(config_key(best.config), math.inf)),
               "replay": replay,
               "grid_table": [{"config": by_key[k], "ms": v, **({"reason": reasons[k]} if k in reasons else {})} for k, v in sorted(table.items(), key=lambda kv: kv[1] or math.inf)]}
        rows.append(row)
        print(f"  grid: {len(table)} configs in {grid_wall:.0f}s, best {short_config(grid_best)} {times[0]:.4g} ms; "
              f"optuna: {study.evaluations} configs in {optuna_wall:.0f}s, best {short_config(best.config)} "
              f"{times[1]:.4g} ms ({row['optuna_vs_grid']:.3f}x the grid's best; within 3% after "
              f"{within} evaluations); default {times[2]:.4g} ms" +
              (f"; replay over {args.replay_seeds} seeds: {replay['within_3pct']:.0%} within 3%"
               if replay else ""), flush=True)
        del problem, study
    ratios = [r["optuna_vs_grid"] for r in rows]
    fracs = [r["evaluation_fraction"] for r in rows]
    summary = {"gpu": setup["gpu"], "buckets": len(rows), "worst_optuna_vs_grid": max(ratios, default=float("nan")),
               "geomean_optuna_vs_grid": geomean(ratios), "max_evaluation_fraction": max(fracs, default=float("nan")),
               "floor_met": bool(rows) and all(r <= 1.03 for r in ratios) and all(f <= 0.3 + 1e-9 for f in fracs),
               "wall_s": time.time() - t_all, "timing_valid": not args.interpret}
    text = (f"compare: {len(rows)} buckets; Optuna's best / grid's best: worst {summary['worst_optuna_vs_grid']:.3f}, "
            f"geomean {summary['geomean_optuna_vs_grid']:.3f}; Optuna used at most "
            f"{summary['max_evaluation_fraction']:.0%} of the grid's evaluations; floor (<= 1.03 with <= 30%): "
            f"{'met' if summary['floor_met'] else 'NOT met'}")
    print(text)
    if args.report:
        lines = [f"# Optuna vs exhaustive grid: {plan_title(args, setup['gpu'])}", "", text, "",
                 "| spec | bucket | grid evals | grid best | grid ms | grid wall s | optuna evals | optuna best | optuna ms "
                 "| optuna / grid | within 3% after | rank in grid | optuna wall s | default ms | replay: within 3% |",
                 "| --- | --- | ---: | --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in rows:
            h = r["head_to_head_ms"]
            rp = r["replay"]
            lines.append(f"| {short_spec(r['spec'])} | {short_bucket(r['bucket'])} | {r['grid_evaluations']} | "
                         f"{short_config(r['grid_best_config'])} | {h['grid_best']:.4g} | {r['grid_wall_s']:.0f} | "
                         f"{r['optuna_evaluations']} | {short_config(r['optuna_best_config'])} | {h['optuna_best']:.4g} | "
                         f"{r['optuna_vs_grid']:.3f} | {r['optuna_within_3pct_after']} | {r['optuna_rank_in_grid']} | "
                         f"{r['optuna_wall_s']:.0f} | {h['default']:.4g} | "
                         f"{(format(rp['within_3pct'], '.0%') + ' of ' + str(rp['seeds'])) if rp else '-'} |")
        lines += ["", "Head-to-head latencies are interleaved re-measurements of the three configs. 'within 3% after' "
                  "counts Optuna's evaluations until one was within 3% of the grid's best by the grid's own "
                  "measurements. 'replay' re-runs the same sampler on the grid's table with other seeds (no GPU)."]
        write_report(args.report, "compare", "\n".join(lines) + "\n", {"summary": summary, "buckets": rows})
    return 0


def replay_sampler(tunable, spec, bucket, table: dict, budget: int, seeds: int, opts) -> dict[str, Any]:
    """Run the tuner's Study on a lookup table instead of the GPU, for several seeds."""
    import dataclasses
    from flashcore.tunable import CheckResult, Problem, config_key
    from . import tuner
    ok = {k: v for k, v in table.items() if v is not None}
    best = min(ok.values())
    found, evals_needed = [], []

    def fake_evaluate(problem, config, o):
        ms = table.get(config_key(config))
        return tuner.Eval(config, ms, "" if ms is not None else "failed in grid")

    problem = Problem(spec=spec, desc={}, bucket=bucket, work=1.0, metric_unit="TFLOP/s", n_sets=1,
                      runner=lambda c: (lambda i: None), check=lambda c: CheckResult(True, 0, 0), device="cpu")
    for s in range(seeds):
        study = tuner.Study(tunable, problem, bucket, dataclasses.replace(opts, seed=1000 + s, retune=True), None,
                            f"replay{s}", evaluator=lambda config: fake_evaluate(problem, config, opts),
                            compiler=lambda configs: None)
        study.run(budget)
        b = study.best(1)
        found.append(b[0].ms / best if b else math.inf)
        evals_needed.append(next((i + 1 for i, ev in enumerate(study.history)
                                  if ev.ms is not None and ev.ms <= 1.03 * best), None))
    hits = [f for f in found if f <= 1.03]
    needed = sorted(e for e in evals_needed if e is not None)
    return {"seeds": seeds, "budget": budget, "within_3pct": len(hits) / max(len(found), 1),
            "median_ratio": sorted(found)[len(found) // 2] if found else None,
            "worst_ratio": max(found) if found else None,
            "median_evals_to_3pct": needed[len(needed) // 2] if needed else None}


# ----------------------------------------------------------------------------------------------- main

def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    command = args.command or "run"
    if getattr(args, "interpret", False) and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        # Triton decides interpreter vs compiler when triton.language is imported (already done by importing
        # flashcore): run again in a process that has TRITON_INTERPRET=1 from the start.
        import subprocess
        env = dict(os.environ, TRITON_INTERPRET="1")
        return subprocess.call([sys.executable, "-m", "flashcore.tools.tune", *argv], env=env)
    handlers = {"run": cmd_run, "export": cmd_export, "import": cmd_import, "merge": cmd_merge,
                "heldout": cmd_heldout, "compare": cmd_compare, "show": cmd_show, "prune": cmd_prune}
    try:
        return handlers[command](args)
    except UsageError as e:
        print(f"flashcore-tune: {e}", file=sys.stderr)
        return 2
    except ImportError as e:
        if "optuna" in str(e):
            print("flashcore-tune: needs Optuna: pip install 'flashcore[tune]'", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
