"""Helpers shared by the flashcore-tune subcommands: plan setup, tuner options, short labels, progress, reports."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Sequence

from flashcore.generator import parse_feature_value
from flashcore.tuning import GPU_ARCH


def _csv(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


class UsageError(Exception):
    pass


def _db_path(args) -> Path:
    from flashcore.tuning_db import user_cache_root, user_db_path
    if getattr(args, "db", None):
        return Path(args.db).expanduser()
    return user_db_path() or user_cache_root() / "tuning.db"


def writable_db_path(args) -> Path:
    """The tuning DB a run records into, created if missing and checked for writing: a DB that cannot take the
    records stops the run before anything is measured, instead of failing each bucket after its measurements."""
    from flashcore.tuning_db import TuningDB, TuningDBError, user_db_path
    path = _db_path(args)
    if getattr(args, "db", None):
        origin = "--db"
    else:
        origin = "$FLASHCORE_TUNING_DB" if os.environ.get("FLASHCORE_TUNING_DB") and user_db_path() else "default"
    try:
        TuningDB(path).close()
    except TuningDBError as e:
        raise UsageError(f"cannot record into the tuning DB ({origin}): {e}") from e
    return path


def table(header: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[int] = ()) -> list[str]:
    """The lines of a text table, each column as wide as its widest cell (nothing cut off: rows that differ in
    one feature must not look alike); the columns numbered in `right` are right-aligned."""
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows)]

    def line(cells):
        return " ".join(cell.rjust(w) if i in right else cell.ljust(w)
                        for i, (cell, w) in enumerate(zip(cells, widths))).rstrip()
    return [line(header)] + [line(row) for row in rows]


def _storage_url(args, gpu: str) -> str:
    """--storage, else the default: an SQLite file per GPU in the user cache (no server, one host)."""
    if args.storage:
        return args.storage
    from flashcore.tuning_db import user_cache_root
    # SQLite, not a journal file: transactional, so a writer killed mid-write leaves no torn record behind
    return f"sqlite:///{user_cache_root() / 'tune' / f'{gpu}.sqlite3'}"


def _detect_gpu(interpret: bool) -> tuple[str, int, str]:
    """(gpu name, arch, device) of what is present."""
    if interpret:
        return "interpreter", 0, "cpu"
    import torch
    from flashcore.device import arch, gpu_name
    if not torch.cuda.is_available():
        return "none", 0, "cpu"
    return gpu_name(0), arch(0), "cuda"


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
    """[(tuning, spec, bucket)] from the CLI options: --kernels, or else every registered op that declares tuning
    and has every --feature axis (`--feature page_size=16` alone tunes the ops with paged caches)."""
    from flashcore import ops
    from flashcore.tuning import tuning_of
    features: dict[str, list] = {}
    for item in args.feature:
        fname, _, values = item.partition("=")
        if not values:
            raise UsageError(f"--feature {item!r}: expected NAME=V1,V2")
        features[fname.strip()] = [parse_feature_value(v) for v in _csv(values)]
    if args.plan == "models":
        return _model_plan(args, arch)
    if args.kernels:
        names = _csv(args.kernels)
    else:
        names = [n for n in ops.names() if ops.get(n).tuning
                 and set(features) <= set(tuning_of(n).axes(args.interpret))]
        if not names:
            raise UsageError(f"no op has every plan axis of --feature ({', '.join(features)}); each op's axes: "
                             + "; ".join(f"{n}: {', '.join(tuning_of(n).axes(args.interpret))}"
                                         for n in ops.names() if ops.get(n).tuning))
    plan = []
    for name in names:
        t = _tuning_named(name)
        axes: dict[str, list] = dict(features)
        if args.dtypes:
            axes["dtype"] = _csv(args.dtypes)
        if args.head_dims:
            axes["head_dim"] = [int(x) for x in _csv(args.head_dims)]
        try:
            buckets = [t.op.parse_bucket(b) for b in _csv(args.buckets)] if args.buckets else None
            items = t.plan(arch, args.interpret, axes, buckets)
        except (TypeError, ValueError) as e:
            raise UsageError(f"{name}: {e}") from e
        plan.extend((t, spec, bucket) for spec, bucket in items)
    return plan


def _tuning_named(name: str):
    """The tuning declaration of op `name`; an op that is not registered is a usage error."""
    from flashcore.tuning import tuning_of
    try:
        return tuning_of(name)
    except KeyError as e:
        raise UsageError(str(e).strip("'\"")) from e


def _model_plan(args, arch: int) -> list[tuple[Any, Any, tuple[int, ...]]]:
    """--plan models: every op that declares model calls (or those of --kernels), in --dtypes (default bf16, fp16)."""
    from flashcore import ops
    if args.interpret:
        raise UsageError("--plan models tunes the models' own shapes: a GPU plan (not --interpret)")
    if args.feature or args.head_dims or args.buckets:
        raise UsageError("--plan models takes its features and buckets from the models: drop --feature, "
                         "--head-dims and --buckets")
    names = _csv(args.kernels) if args.kernels else [n for n in ops.names() if ops.get(n).tuning]
    plan = []
    for name in names:
        t = _tuning_named(name)
        if t.model_calls is None:
            if args.kernels:
                raise UsageError(f"{name} has no models plan yet; use --plan grid")
            continue
        plan.extend((t, spec, bucket) for spec, bucket in t.model_plan(arch, _csv(args.dtypes or "bf16,fp16")))
    return plan


def _prior_records(paths) -> tuple:
    from flashcore.tuning_db import BundleError, read_bundle
    records = []
    for path in paths:
        try:
            records += read_bundle(path)[1]
        except BundleError as e:
            raise UsageError(f"--seed-bundle: {e}") from e
    return tuple(records)


def _options(args, gpu: str, deadline: float | None = None):
    from .tuner import TuneOptions
    interpret = args.interpret
    return TuneOptions(gpu=gpu, interpret=interpret, trials=args.trials, timeout=args.timeout,
                       grid=getattr(args, "grid", False), batch=1 if interpret else args.batch,
                       startup=3 if interpret else 5, compile_threads=args.compile_threads,
                       verify_rounds=1 if interpret else 3, rep_ms=args.rep_ms, replays=args.replays,
                       retune=getattr(args, "retune", False), seed=args.seed, deadline=deadline,
                       prior=_prior_records(getattr(args, "seed_bundle", [])))


def short_spec(spec_key: str) -> str:
    """A spec's features in a few words: values as name=value, then true flags by name (arch and op left out)."""
    fields = {k: v for k, v in sorted(json.loads(spec_key).items()) if k not in ("op", "arch")}
    values = [f"{k}={v}" for k, v in fields.items() if not isinstance(v, bool)]
    return " ".join(values + [k for k, v in fields.items() if v is True])


def short_config(config: dict[str, int]) -> str:
    return "/".join(str(v) for v in config.values()) if config else "-"


def short_bucket(bucket) -> str:
    return "x".join(str(x) for x in bucket)


def plan_title(args, gpu: str) -> str:
    return f"flashcore-tune on {gpu}" + (" (Triton interpreter: timings meaningless)" if args.interpret else "")


def geomean(values: Sequence[float]) -> float:
    values = [v for v in values if v > 0]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


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
