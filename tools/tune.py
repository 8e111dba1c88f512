"""flashcore-tune: tune FlashCore kernels on this GPU, and manage tuning DBs and bundles.

    flashcore-tune [run] [--gpu auto|h100|...] [--kernels attn_fwd] [--dtypes bf16,fp16] [--head-dims 64,128]
                   [--feature causal=false,true] [--buckets 4096x4096x64,...] [--trials 16] [--timeout S]
                   [--budget S] [--grid] [--dry-run] [--storage URL] [--devices 0,1] [--grace S] [--interpret]
                   [--db PATH] [--report PATH]
    flashcore-tune status  [--storage URL] [--gpu G] [--interpret]   buckets done, running, left; time left
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
persist in --storage (default: an SQLite file in ~/.cache/flashcore/tune/), so re-running the same command
resumes an interrupted run. Workers share the studies: --devices starts one per GPU of this host; with
--storage postgresql://... the same command on other hosts adds theirs (each writes every record of the plan
into its own --db), and `status --storage postgresql://...` shows the progress from anywhere. --interpret runs
the whole pipeline on the CPU through the Triton interpreter with tiny shapes (timings meaningless, flagged as
such in the records).
"""
from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import time
from typing import Any, Sequence

from .tune_bundles import cmd_export, cmd_import, cmd_merge, cmd_prune, cmd_show
from .tune_common import (Progress, UsageError, _csv, _options, _setup, _storage_url, geomean, plan_title,
                          short_bucket, short_config, short_spec, table, writable_db_path, write_report)
from .tune_eval import cmd_compare, cmd_heldout
from .tune_status import cmd_status
from .tune_storage import GRACE_S, StorageError

# Set in the environment of a re-executed flashcore-tune: the pid of the process it must not outlive.
PARENT_ENV = "FLASHCORE_TUNE_PARENT_PID"

SUBCOMMANDS = ("run", "status", "export", "import", "merge", "heldout", "compare", "show", "prune")

# Cost model of --dry-run (seconds per compile / evaluation / bucket).
# gpu: H100 + Triton 3.6, fitted to an H100 run of 18 buckets (6 specs, 16 configs each): 131 s measured, 139 s
# estimated.
# interpreter: fitted to `time flashcore-tune --interpret` (its default plan: 8 buckets, 42 evaluations) on a
# 2-core Xeon @ 2.8 GHz, Triton 3.9, torch 2.13 CPU, 2026-12-07: 93 s and 92 s measured (85 s of it in the
# buckets, the rest process start and studies), 90 s estimated; the earlier figures (eval 0.35, verify 0.5,
# problem 0.05) estimated 19 s. Per bucket: a least-squares line over both runs' bucket times (1.1 s per
# evaluation, 4.7 s per bucket); `problem` also carries the plan's share of the ~7 s start. A bucket's time
# varies 3x with its shape (4 evaluations: 3 s at attn_fwd 32x32x2, 19 s at attn_decode 8x128x2), so the estimate
# holds for whole plans, not for one bucket.
COST = {"gpu": {"compile": 0.3, "eval": 0.2, "verify": 0.8, "problem": 0.3},
        "interpreter": {"compile": 0.0, "eval": 1.1, "verify": 4.0, "problem": 1.5}}


# ------------------------------------------------------------------------------------------------- args

def _plan_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gpu", default="auto", help="GPU the records are for: auto (detected), h100, h200, a100, ...")
    p.add_argument("--force", action="store_true", help="record for --gpu even if another GPU is present")
    p.add_argument("--kernels", "--ops", dest="kernels", default=None,
                   help="ops to tune, comma separated (default: every registered op that declares tuning and "
                        "has every --feature axis)")
    p.add_argument("--dtypes", default=None, help="e.g. bf16,fp16 (default: the template's plan)")
    p.add_argument("--head-dims", default=None, help="e.g. 64,128,256 (default: the template's plan)")
    p.add_argument("--feature", action="append", default=[], metavar="NAME=V1,V2",
                   help="sweep a feature axis, e.g. causal=false,true or gqa_group=1,8 (repeatable)")
    p.add_argument("--buckets", default=None, help="shape buckets instead of the plan's, e.g. 4096x4096x64,1024x1024x256")
    p.add_argument("--plan", choices=("grid", "models"), default="grid",
                   help="grid: each op's own plan (its feature axes x buckets); models: the buckets of the calls "
                        "widely used open models make (flashcore/models.py), for the ops that declare them")
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


def _storage_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--storage", default=None,
                   help="Optuna storage of the studies: sqlite:///PATH (default ~/.cache/flashcore/tune/<gpu>.sqlite3: "
                        "this host's workers), postgresql://USER:PASSWORD@HOST:PORT/DB (workers on any number of "
                        "hosts), a journal file path, or 'memory'")
    p.add_argument("--grace", type=int, default=GRACE_S,
                   help=f"seconds after which a worker of another host that sent no heartbeat is taken for dead and "
                        f"its configs are measured by others (PostgreSQL storage; default {GRACE_S})")


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
    _storage_args(p)
    p.add_argument("--devices", default=None,
                   help="worker processes sharing the studies and DB: a count N (the first N GPUs), GPU "
                        "indices '0,1' ('3,' for GPU 3 alone), or 'all'; with --interpret, N CPU workers")
    p.add_argument("--retune", action="store_true", help="start the studies over (ignore stored trials)")
    p.add_argument("--seed-bundle", action="append", default=[], metavar="BUNDLE",
                   help="seed each study with the configs of this bundle's records for the same GPU, bucket and "
                        "features, e.g. the shipped bundle of the previous op version (repeatable)")

    p = sub.add_parser("status", help="progress of the studies in a storage: buckets done, running, left; time left")
    p.add_argument("--gpu", default="auto", help="GPU whose default storage to read, and whose studies to show")
    p.add_argument("--interpret", action="store_true", help="the --interpret runs' studies")
    _storage_args(p)

    p = sub.add_parser("export", help="DB records -> a reviewable JSON bundle per GPU")
    p.add_argument("--db", default=None)
    p.add_argument("--gpu", default=None, help="GPU to export (default: every GPU in the DB, one file each)")
    p.add_argument("-o", "--out", default=None, help="bundle file, or a directory for <gpu>.json (default: .)")
    p.add_argument("--include-stale", action="store_true", help="also records of old template versions")

    p = sub.add_parser("import", help="bundles -> DB records (keeps the faster record of a key)")
    p.add_argument("bundles", nargs="+")
    p.add_argument("--db", default=None)
    p.add_argument("--prefer", choices=("fastest", "newest"), default="fastest")
    p.add_argument("--strict", action="store_true",
                   help="a record the op rejects fails the import (exit 1, that bundle's records not written)")

    p = sub.add_parser("merge", help="several bundles of one GPU -> one bundle")
    p.add_argument("bundles", nargs="+")
    p.add_argument("-o", "--out", required=True)
    p.add_argument("--prefer", choices=("fastest", "newest"), default="fastest")

    p = sub.add_parser("heldout", help="default vs dispatch's choice on shapes between the plan's buckets")
    _plan_args(p)
    _tuning_args(p)
    p.add_argument("--shape", action="append", default=[], metavar="FIELD=V ...",
                   help="an extra call of each planned spec: fields of the op's call description replaced in the "
                        "spec's first plan call, e.g. --shape 'batch=3 seqlen_q=1536 seqlen_k=1536' (repeatable)")
    p.add_argument("--with-plan-buckets", action="store_true",
                   help="also re-measure the plan's own bucket shapes (tuned vs default, independently of the run)")
    p.add_argument("--validate", action="store_true",
                   help="record what was measured into --db: each held-out bucket without a record of its own gets "
                        "one, the nearest bucket's config where it beat the default there by 2%%, else the default "
                        "(so dispatch never uses an untried neighbour's config where it was measured slower)")

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


def _metric(r) -> str:
    """A bucket's throughput; n/a under the interpreter, whose timings say nothing about a GPU."""
    return f"{r.metric:.1f} {r.metric_unit}" if r.timing_valid else "n/a"


def _result_line(r) -> str:
    if r.status in ("tuned", "cached"):
        return (f"  {r.op} {short_spec(r.spec)} {short_bucket(r.bucket)}: default {short_config(r.default_config)}"
                f" {r.default_ms:.4g} ms -> {short_config(r.config)} {r.ms:.4g} ms ({r.speedup:.2f}x, "
                f"{_metric(r)}; {r.evaluations}/{r.feasible} configs, {r.wall_s:.0f}s)"
                + (" [cached]" if r.status == "cached" else ""))
    return f"  {r.op} {short_spec(r.spec)} {short_bucket(r.bucket)}: {r.status} {r.note}"


# ------------------------------------------------------------------------------------------------ run

def _worker_items(n_items: int, worker: int, workers: int) -> list[int]:
    """Own share first (round robin), then everyone else's: a worker that runs out joins studies in progress."""
    own = list(range(worker, n_items, workers))
    return own + [i for i in range(n_items) if i % workers != worker]


def run_items(items, opts, db_path: str, storage_url: str, device: str, emit, worker: int = 0,
              workers: int = 1, grace_s: int = GRACE_S) -> list:
    """Tune the plan items (a worker's share first, buckets no process started before others); emit(event,
    payload) reports progress."""
    from flashcore.tuning_db import TuningDB
    from .tune_storage import make_storage
    from .tuner import study_name, tune_bucket, untouched_first
    storage = make_storage(storage_url, grace_s)
    db = TuningDB(db_path)
    names = [study_name(opts.gpu, spec, bucket, opts.mode) for _, spec, bucket in items]
    order = _worker_items(len(items), worker, workers)
    results = []
    while order:
        index = order.pop(untouched_first(storage, [names[i] for i in order]))
        tunable, spec, bucket = items[index]
        if opts.deadline and time.time() > opts.deadline:
            emit("budget", {"index": index})
            break
        emit("start", {"index": index, "label": f"{tunable.name} {short_spec(spec.key())} {short_bucket(bucket)}",
                       "target": sum(map(opts.target, tunable.study_sizes(spec, bucket)))})
        result = tune_bucket(tunable, spec, bucket, opts, storage, db, device,
                             log=lambda line: emit("log", {"line": line}),
                             on_eval=lambda ev: emit("eval", {"ok": ev.ms is not None}))
        results.append((index, result))
        emit("done", {"index": index, "result": result})
    db.close()
    return results


def _die_with_parent(parent: int) -> None:
    """Make this process end when `parent` does, however it ends (SIGKILL included), instead of measuring on and
    writing records for a run that was stopped. Call it first thing in a child process."""
    if sys.platform.startswith("linux"):
        import ctypes
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != parent:      # the parent died before the request above took effect: nothing would kill us
        os._exit(1)


def _worker_main(worker: int, workers: int, device_index: str, args_dict: dict, gpu: str, db_path: str,
                 storage_url: str, deadline: float | None, queue, parent: int) -> None:
    """A worker process: one GPU (or one CPU interpreter), the shared storage and DB."""
    _die_with_parent(parent)
    if device_index != "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = device_index
    args = argparse.Namespace(**args_dict)
    if args.interpret:
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        setup = _setup(argparse.Namespace(**{**args_dict, "gpu": gpu, "force": True}))
        opts = _options(args, gpu, deadline)
        if not args.compile_threads:           # the host's cores split between its workers' parallel compiles
            opts.compile_threads = max(1, (os.cpu_count() or 1) // workers)

        def emit(event, payload):
            if event == "done":
                payload = {"index": payload["index"], "result": payload["result"].to_json()}
            queue.put((worker, event, payload))
        run_items(setup["plan"], opts, db_path, storage_url, setup["device"], emit, worker, workers, args.grace)
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
        print_plan(plan, args, setup, _options(args, gpu, None))
        return 0
    from .tune_storage import make_storage
    from .tuner import BucketResult, register_plan
    db_path = str(writable_db_path(args))
    storage_url = _storage_url(args, gpu)
    deadline = time.time() + args.budget if args.budget else None
    opts = _options(args, gpu, deadline)
    # once, before any worker starts: creates the storage's tables, starts the studies over for --retune, and
    # notes the plan's buckets in the storage for `status`
    register_plan(make_storage(storage_url, args.grace), plan, opts)
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
            progress.write("  --budget reached: stopping (re-run the same command to resume)")

    try:
        if len(devices) <= 1:
            if devices and devices[0] != "cpu":
                import torch
                torch.cuda.set_device(int(devices[0]))
            run_items(plan, opts, db_path, storage_url, setup["device"], lambda e, p: handle(0, e, p),
                      grace_s=args.grace)
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
    if len(rows) < len(plan):
        print(f"{len(plan) - len(rows)} buckets not started (--budget): run the same command again to resume")
    # a failed bucket (no config ran, or its record could not be written) is a plan not done: a re-run resumes it
    return 1 if summary["failed"] or rows and not summary["tuned"] else 0


def _run_workers(args, devices, gpu, db_path, storage_url, deadline, handle) -> None:
    import multiprocessing as mp
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    args_dict = vars(args).copy()
    procs = [ctx.Process(target=_worker_main, args=(w, len(devices), dev, args_dict, gpu, db_path, storage_url,
                                                     deadline, queue, os.getpid()), daemon=False)
             for w, dev in enumerate(devices)]
    import queue as queue_mod
    try:
        for p in procs:
            p.start()
        alive = len(procs)
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
    except BaseException:
        # Ctrl-C or an error here: stop the workers now (at exit, multiprocessing would wait for them to finish)
        for p in procs:
            if p.pid is not None:
                p.terminate()
        raise
    finally:
        for p in procs:
            if p.pid is not None:
                p.join()


def print_plan(plan, args, setup, opts) -> None:
    gpu = setup["gpu"]
    interpret = args.interpret
    cost = COST["interpreter" if interpret else "gpu"]
    rows, per_spec = [], {}
    total_evals = 0
    for t, spec, bucket in plan:
        sizes = t.study_sizes(spec, bucket)        # one study, or one per kernel the op tunes separately
        feasible, target = sum(sizes), sum(map(opts.target, sizes))
        total_evals += target
        rows.append((t.name, short_spec(spec.key()), short_bucket(bucket), str(feasible), str(target)))
        acc = per_spec.setdefault(spec.key(), [0, feasible])
        acc[0] += target
        acc[1] = max(acc[1], feasible)
    print(f"plan for {gpu} (sm{setup['arch']}): {len(plan)} buckets, {len(per_spec)} kernel specs")
    print("\n".join(table(("op", "spec", "bucket", "feasible", "evals"), rows, right=(3, 4))))
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

def summarize(rows, wall: float, gpu: str, interpret: bool) -> dict[str, Any]:
    tuned = [r for r in rows if r.status in ("tuned", "cached") and r.default_ms > 0]
    speedups = [r.speedup for r in tuned]
    slower = [r for r in tuned if r.ms > r.default_ms * 1.0000001]
    failed = [r for r in rows if r.status == "failed"]
    cached = [r for r in tuned if r.status == "cached"]
    summary = {"gpu": gpu, "buckets": len(rows), "tuned": len(tuned), "cached": len(cached), "failed": len(failed),
               "geomean_speedup": geomean(speedups), "min_speedup": min(speedups) if speedups else float("nan"),
               "max_speedup": max(speedups) if speedups else float("nan"), "slower_than_default": len(slower),
               "wall_s": wall, "timing_valid": not interpret,
               "evaluations": sum(r.evaluations for r in rows), "trials": sum(r.trials for r in rows)}
    speedup = (f"geomean speedup over the default {summary['geomean_speedup']:.3f}x (min "
               f"{summary['min_speedup']:.3f}x, max {summary['max_speedup']:.3f}x)" if speedups
               else "no speedup (no bucket tuned)")
    summary["text"] = (f"{len(tuned)}/{len(rows)} buckets tuned"
                       + (f" ({len(cached)} found done: cached)" if cached else "")
                       + f", {len(failed)} failed; {speedup}; {summary['evaluations']} configs measured; wall "
                       f"{wall:.0f}s" + ("  [interpreter: timings meaningless]" if interpret else ""))
    return summary


def print_table(rows, interpret: bool) -> None:
    if not rows:
        return

    def cells(r):
        measured = (f"{r.default_ms:.4g}", short_config(r.config), f"{r.ms:.4g}", f"{r.speedup:.3f}") \
            if r.status in ("tuned", "cached") else ("-",) * 4
        return (r.op, short_spec(r.spec), short_bucket(r.bucket), short_config(r.default_config), *measured,
                f"{r.evaluations}/{r.feasible}", f"{r.wall_s:.0f}",
                "" if r.status == "tuned" else f"{r.status} {r.note}".strip())
    lines = table(("op", "spec", "bucket", "default", "ms", "tuned", "ms", "speedup", "evals", "wall s", ""),
                  [cells(r) for r in rows], right=(4, 6, 7, 8, 9))
    print("\n" + lines[0] + "\n" + "-" * len(lines[0]) + "\n" + "\n".join(lines[1:]))
    if legend := _config_legend(rows):
        print(f"configs: {legend}")


def _config_legend(rows) -> str:
    """What the parts of each op's configs are (ops have different tunables)."""
    keys = {r.op: "/".join(r.default_config) for r in rows if r.default_config}
    return "; ".join(f"{op} {names}" for op, names in keys.items())


def tune_markdown(rows, summary, title: str) -> str:
    lines = [f"# {title}", "", summary["text"], "", f"Configs: {_config_legend(rows)}. Latencies are medians (ms).", "",
             "| op | spec | bucket | default | default ms | tuned | tuned ms | speedup | metric | evals / feasible "
             "| trials | wall s | status |",
             "| --- | --- | --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        lines.append(f"| {r.op} | {short_spec(r.spec)} | {short_bucket(r.bucket)} | {short_config(r.default_config)} "
                     f"| {r.default_ms:.4g} | {short_config(r.config)} | {r.ms:.4g} | {r.speedup:.3f} | "
                     f"{_metric(r)} | {r.evaluations}/{r.feasible} | {r.trials} | {r.wall_s:.1f} | "
                     f"{r.status}{' ' + r.note if r.note else ''} |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------- main

def main(argv: Sequence[str] | None = None) -> int:
    as_program = argv is None                   # flashcore-tune / python -m, not a call from other Python code
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    command = args.command or "run"
    if getattr(args, "interpret", False) and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        # Triton decides interpreter vs compiler when triton.language is imported (already done by importing
        # flashcore): run again in a process that has TRITON_INTERPRET=1 from the start.
        again = [sys.executable, "-m", "flashcore.tools.tune", *argv]
        env = dict(os.environ, TRITON_INTERPRET="1")
        if as_program:
            # the program itself: become the new process, so a signal to this pid reaches the tuner (no orphan)
            sys.stdout.flush()
            sys.stderr.flush()
            os.execve(sys.executable, again, env)
        # called from another program, which must get control back: a child that dies with this process
        import subprocess
        return subprocess.call(again, env={**env, PARENT_ENV: str(os.getpid())})
    if PARENT_ENV in os.environ:
        _die_with_parent(int(os.environ.pop(PARENT_ENV)))
    handlers = {"run": cmd_run, "status": cmd_status, "export": cmd_export, "import": cmd_import, "merge": cmd_merge,
                "heldout": cmd_heldout, "compare": cmd_compare, "show": cmd_show, "prune": cmd_prune}
    from flashcore.tuning_db import BundleError, TuningDBError
    try:
        status = handlers[command](args)
        sys.stdout.flush()      # here, not at exit, so that a reader gone is caught below
        return status
    except BrokenPipeError:
        if not as_program:      # the caller's stdout: not ours to redirect
            raise
        # stdout's reader is gone (`flashcore-tune show | head`): stop quietly, stdout pointed at /dev/null so that
        # Python's flush at exit does not fail again (Python's documented idiom)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (UsageError, StorageError, TuningDBError, BundleError) as e:
        print(f"flashcore-tune {command}: {e}", file=sys.stderr)
        return 2
    except ImportError as e:
        if "optuna" in str(e):
            print("flashcore-tune: needs Optuna: pip install 'flashcore[tune]'", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
