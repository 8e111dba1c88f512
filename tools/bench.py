"""flashcore-bench: every registered op's benchmark suites, FlashCore against its peers, in one process.

Each op names its suites in `Op.bench` (what a suite is: tools/bench_suite.py); this harness finds them through
the op registry, adds each suite's own options to the command line, times every implementation of every case,
computes the ratios and writes the reports. A peer that fails on a case is recorded (n/a) and the run goes on.
FlashCore's output is checked against the suite's reference once per case; a wrong answer is flagged in the
`check` column and makes the exit status 1.

Usage:
    flashcore-bench --list                        # every op's suites and cases: no GPU needed
    flashcore-bench --out $OUT                    # every suite
    flashcore-bench --op OP --suite SUITE --out $OUT
    flashcore-bench --help                        # the suites' own options too
    flashcore-bench --replot bench_out/*.json     # plots of saved reports (tools/bench_plot.py): no GPU needed

Writes <op>.<suite>.json, .csv and .md (a table to paste into BENCHMARKS.md) to --out after every case, and with
--plot <op>.<suite>.png (FlashCore beside its peers, per case) at the end of each suite.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import functools
import gc
import json
import re
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from flashcore import ops
from flashcore.tools.bench_suite import Case, Suite

# rate unit -> (work units per unit, --list's work unit, short name in table headers)
UNITS = {"TFLOP/s": (1e12, "TFLOP", "TF"), "GB/s": (1e9, "GB", "GB/s")}
# Host timing: calls issued back to back per sample (few enough that the launch queue never fills and blocks the
# loop) and samples; latency takes HOST_CALLS synchronized calls.
HOST_CALLS = 100
HOST_REPEATS = 20
FLUSH_BYTES = 256 * 1024 * 1024      # the read flush sweeps as much as do_bench's zero_ writes: 5x a Hopper L2


@dataclass
class Selected:
    """One suite of one op, with the cases and impls the options select."""
    op: str
    suite: Suite
    cases: list[Case]
    impls: list[str]

    @property
    def stem(self) -> str:   # report file names
        return f"{self.op}.{self.suite.name}"


def discover() -> list[tuple[str, Suite]]:
    """(op name, suite) for every registered op that declares suites, in registry order."""
    found = []
    for name in ops.names():
        target = ops.get(name).bench
        found += [(name, suite) for suite in (ops.resolve(target) if target else [])]
    return found


# ---------------------------------------------------------------------------------------------- timing

def short_error(exc: BaseException, caught=()) -> str:
    """One line: the exception, and the first warning raised with it (SDPA puts its reasons there)."""
    lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()] or [""]
    text = f"{type(exc).__name__}: {lines[0]}"
    reasons = [re.sub(r"\s*\(Triggered internally at .*?\)", "", str(w.message)).strip() for w in caught]
    reasons = list(dict.fromkeys(r.splitlines()[0] for r in reasons if r))
    return (text + (f" ({' '.join(reasons)})" if reasons else ""))[:240]


def device_ms(fn: Callable, warmup_ms: float, rep_ms: float, flush: str = "write") -> float:
    """Median milliseconds per call: CUDA events around each call, L2 flushed before it (Suite.flush says how)."""
    if flush == "write":
        from triton.testing import do_bench
        return do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")
    sweep, sink = _sweep_buffers()
    return _events_ms(fn, lambda: torch.sum(sweep, dim=0, out=sink), warmup_ms, rep_ms)


def _events_ms(fn: Callable, flush: Callable, warmup_ms: float, rep_ms: float) -> float:
    """do_bench's loop with another flush: estimate from five flushed calls, warm up, then flush and time each."""
    def event():
        return torch.cuda.Event(enable_timing=True)
    start, end = event(), event()
    start.record()
    for _ in range(5):
        flush()
        fn()
    end.record()
    torch.cuda.synchronize()
    estimate_ms = start.elapsed_time(end) / 5
    for _ in range(max(1, int(warmup_ms / estimate_ms))):
        fn()
    timed = [(event(), event()) for _ in range(max(1, int(rep_ms / estimate_ms)))]
    for start, end in timed:
        flush()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in timed)


@functools.lru_cache(maxsize=1)
def _sweep_buffers() -> tuple[torch.Tensor, torch.Tensor]:
    """The read flush's source (as large as do_bench's) and the 0-d tensor its sum lands in."""
    return torch.zeros(FLUSH_BYTES // 4, device="cuda"), torch.zeros((), device="cuda")


def host_us(fns: dict[str, Callable], calls: int = HOST_CALLS, repeats: int = HOST_REPEATS) -> dict[str, dict]:
    """{name: {'host_us', 'latency_us'}} per call of each fn, in microseconds, the fns timed in turns.

    host_us: CPU time to issue one call: `calls` calls back to back with no sync inside, timed around the issuing
    loop only, after a synchronize (an empty queue); the median over `repeats` samples of the per-call mean.
    latency_us: one call then synchronize, median over `calls` calls.
    Each round takes one sample of every fn, in an order that rotates from round to round, so that a host whose
    speed drifts during the run (other tenants, clocks) weighs on every fn alike rather than on whichever ran
    in the slow stretch; latencies interleave the same way.
    """
    names = list(fns)
    for name in names:           # warm: allocator, caches, launch plans
        for _ in range(calls):
            fns[name]()
    samples = {name: [] for name in names}
    for r in range(repeats):
        for name in _in_turn(names, r):
            fn = fns[name]
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            samples[name].append((time.perf_counter() - start) / calls)
    torch.cuda.synchronize()
    latencies = {name: [] for name in names}
    for i in range(calls):
        for name in _in_turn(names, i):
            start = time.perf_counter()
            fns[name]()
            torch.cuda.synchronize()
            latencies[name].append(time.perf_counter() - start)
    return {name: {"host_us": statistics.median(samples[name]) * 1e6,
                   "latency_us": statistics.median(latencies[name]) * 1e6} for name in names}


def _in_turn(names: list[str], round_: int) -> list[str]:
    """`names` rotated by `round_`: round r starts with names[r % len(names)]."""
    k = round_ % len(names)
    return names[k:] + names[:k]


def peak_mib(fn: Callable) -> float:
    """MiB of device memory one call of fn allocates at its peak beyond what was allocated before it (inputs and
    anything else alive stay out of it): torch.cuda.max_memory_allocated() after the call, the peak reset just before
    it, minus torch.cuda.memory_allocated() before it. Counts what goes through PyTorch's allocator only.
    The garbage collector runs first and then stays off: a collection between the two readings (a previous
    call's autograd graph freed there) once gave a negative peak."""
    torch.cuda.synchronize()
    gc.collect()
    gc.disable()
    try:
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    finally:
        gc.enable()


def _failed(exc: BaseException, caught=()) -> dict:
    """{'error'} for an impl that raised; after an out-of-memory error the cache is emptied for the next one."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        torch.cuda.empty_cache()
    return {"error": short_error(exc, caught)}


def first_call(fn: Callable) -> dict | None:
    """One untimed call (compiles; a peer that cannot run raises here): None, or {'error'} if it raised."""
    try:
        # warnings recorded around the first call only: they hold a failing peer's reasons, and recording them
        # on every timed call would add to the host time
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn()
        torch.cuda.synchronize()
    except Exception as exc:
        return _failed(exc, caught)
    return None


def time_impls(fns: dict[str, Callable], suite: Suite, case: Case, args) -> dict[str, dict]:
    """{name: timing} for every impl: after a first call each, the suite's timing: {'ms', 'rate'} (device: the
    median of --rounds rounds, the impls in turns; with Suite.memory also 'mib', peak_mib of one call) or
    {'host_us', 'latency_us'} (host: the impls in turns, host_us), or {'error'} if anything raised."""
    results = {name: first_call(fn) for name, fn in fns.items()}
    ready = {name: fn for name, fn in fns.items() if results[name] is None}
    if suite.timing == "host":
        try:
            results.update(host_us(ready) if ready else {})
        except Exception as exc:
            results.update({name: _failed(exc) for name in ready})
        return results
    memory = {}
    for name in list(ready) if suite.memory else ():
        try:     # after the first call: a compile's or an allocator's one-time allocations are not the call's
            memory[name] = {"mib": peak_mib(ready[name])}
        except Exception as exc:
            results[name] = _failed(exc)
            del ready[name]
    # rounds of every impl in a rotating order, each round a share of --rep-ms: a slow stretch of the GPU (clocks,
    # another tenant) then weighs on every impl alike instead of on whichever was timed in it
    samples = {name: [] for name in ready}
    for r in range(args.rounds):
        for name in _in_turn(list(samples), r):
            try:
                samples[name].append(device_ms(ready[name], args.warmup_ms, args.rep_ms / args.rounds,
                                               flush_of(suite, args)))
            except Exception as exc:
                results[name] = _failed(exc)
                del samples[name]
    for name, times in samples.items():
        ms = statistics.median(times)
        results[name] = {"ms": ms, "rate": case.work / (ms * 1e-3) / UNITS[suite.unit][0], **memory.get(name, {})}
    return results


def flush_of(suite: Suite, args) -> str:
    """The L2 flush before each timed call: --flush, else the suite's."""
    return args.flush or suite.flush


def run_case(suite: Suite, case: Case, impls: list[str], args) -> dict:
    """Inputs built once (seeded), FlashCore checked, then every impl timed on them."""
    torch.manual_seed(0)
    prepared = suite.setup(case, impls)
    result = {"case": dataclasses.asdict(case.call), "columns": case.columns, "label": case.label, "work": case.work,
              "check": None}
    if prepared.check is not None:
        try:
            result["check"] = prepared.check()
        except Exception as exc:
            result["check"] = {"status": "ERROR", "error": short_error(exc)}
    result["impls"] = time_impls({name: prepared.impls[name] for name in impls}, suite, case, args)
    del prepared   # the inputs, before the next case allocates its own
    torch.cuda.empty_cache()
    return add_ratios(result, suite)


def add_ratios(result: dict, suite: Suite) -> dict:
    """best_peer (the fastest impl that is not FlashCore's) and ratios {column: FlashCore's number over the other's}:
    throughput (device timing, > 1: FlashCore faster) or host time (host timing, < 1: FlashCore cheaper)."""
    key = "host_us" if suite.timing == "host" else "ms"
    impls = result["impls"]
    ours = impls.get("flashcore", {}).get(key)
    timed = {n: r[key] for n, r in impls.items() if n != "flashcore" and key in r}
    peers = {n: t for n, t in timed.items() if n not in suite.variants}
    best = min(peers, key=peers.get) if peers else None   # less time is better in both timings
    result["best_peer"] = best
    result["ratios"] = {}
    for column in suite.ratios:
        other = timed.get(best if column == "best" else column)
        if ours and other:
            result["ratios"][column] = ours / other if suite.timing == "host" else other / ours
        else:
            result["ratios"][column] = None
    return result


# ---------------------------------------------------------------------------------------------- output

def _cell(r: dict) -> str:
    if "ms" in r:
        return f"{r['ms']:.3f} / {r['rate']:.0f}"
    if "host_us" in r:
        return f"{r['host_us']:.1f} / {r['latency_us']:.1f}"
    return "n/a"


def _mib(r: dict) -> str:
    return f"{r['mib']:.0f}" if "mib" in r else "n/a"


def _memory_columns(suite: Suite) -> bool:
    return suite.memory and suite.timing == "device"


def _ratio(x) -> str:
    return f"{x:.2f}" if x is not None else "-"


def _check(c: dict | None) -> str:   # the status, with the error size when wrong
    if c is None:
        return "-"
    return c["status"] if c["status"] != "WRONG" else f"WRONG {c['max_err']:.1e} > {c['tolerance']:.1e}"


def _ratio_columns(suite: Suite, impls: list[str]) -> list[str]:
    """The suite's ratio columns whose other side is part of this run."""
    return [c for c in suite.ratios if c == "best" or c in impls]


def table_rows(results, suite: Suite, impls) -> tuple[list[str], list[list[str]]]:
    unit = f"ms/{UNITS[suite.unit][2]}" if suite.timing == "device" else "host/lat us"
    ratio_columns = _ratio_columns(suite, impls)
    head = [h for h, _ in results[0]["columns"]] if results else []
    head += [f"{suite.labels.get(i, i)} {unit}" for i in impls]
    head += [f"{suite.labels.get(i, i)} MiB" for i in impls] if _memory_columns(suite) else []
    for c in ratio_columns:
        head += [suite.ratios[c], "best"] if c == "best" else [suite.ratios[c]]
    head += ["check"]
    rows = []
    for r in results:
        row = [cell for _, cell in r["columns"]] + [_cell(r["impls"].get(i, {})) for i in impls]
        row += [_mib(r["impls"].get(i, {})) for i in impls] if _memory_columns(suite) else []
        for c in ratio_columns:
            row += [_ratio(r["ratios"][c])]
            if c == "best":
                row += [suite.labels.get(r["best_peer"], "-")]
        rows.append(row + [_check(r["check"])])
    return head, rows


def format_table(results, suite: Suite, impls) -> str:
    """Fixed-width text table, one row per case."""
    head, rows = table_rows(results, suite, impls)
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    lines = ["  ".join(x.rjust(w) for x, w in zip(line, widths)) for line in [head] + rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def describe_cells(suite: Suite, meta: dict) -> str:
    """What a cell and a ratio mean, for the report."""
    if suite.timing == "host":
        return (f"Cells: host us / latency us per call. host: CPU time to issue one call ({HOST_CALLS} calls back "
                f"to back, no sync; median of {HOST_REPEATS} samples, the impls sampled in turns); latency: one call "
                "then synchronize (median). "
                "Ratios: FlashCore's host time over the other's (< 1: FlashCore cheaper).")
    flush = {"write": "do_bench: a 256 MB zero_ before each call leaves L2 dirty",
             "read": "do_bench's loop with a 256 MB read before each call: L2 left clean"}[meta["flush"]]
    memory = (" MiB: the peak device memory one call allocates beyond what was allocated before it "
              "(torch.cuda.max_memory_allocated, PyTorch's allocator only), measured once after the first call."
              if _memory_columns(suite) else "")
    return (f"Cells: median ms / {suite.unit} ({flush}; median of {meta['rounds']} rounds, the impls in turns; "
            f"warmup {meta['warmup_ms']} ms per round, rep {meta['rep_ms']} ms in all). "
            "Ratios: FlashCore's throughput over the other's (> 1: FlashCore faster)." + memory)


def format_markdown(results, suite: Suite, impls, meta: dict) -> str:
    """The table for BENCHMARKS.md, with the card, date, versions and command line on top."""
    head, rows = table_rows(results, suite, impls)
    versions = "".join(f", {name}: {version}" for name, version in meta["peers"].items())
    lines = [f"### {suite.title}: {meta['device']}, {meta['date']}", "",
             f"torch {meta['torch']}, triton {meta['triton']}, cuDNN {meta['cudnn']}, "
             f"flashcore {meta['flashcore']}{versions}.  ",
             f"Command: `{meta['command']}`  ",
             describe_cells(suite, meta) + (" " + suite.notes if suite.notes else ""), "",
             "| " + " | ".join(head) + " |", "|" + "|".join("---:" for _ in head) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def csv_records(results, suite: Suite, impls) -> list[dict]:
    """Flat rows: the case's fields and work, each impl's numbers or error, the ratios and the check."""
    numbers = ("host_us", "latency_us") if suite.timing == "host" else ("ms", "rate")
    numbers += ("mib",) if _memory_columns(suite) else ()
    records = []
    for r in results:
        rec = {**r["case"], "work": r["work"]}
        for i in impls:
            got = r["impls"].get(i, {})
            rec.update({f"{i}_{n}": got.get(n) for n in numbers + ("error",)})
        rec["best_peer"] = r["best_peer"]
        rec.update({f"vs_{c}": r["ratios"][c] for c in _ratio_columns(suite, impls)})
        check = r["check"] or {}
        rec.update(check=check.get("status"), max_err=check.get("max_err"), tolerance=check.get("tolerance"))
        records.append(rec)
    return records


def write_outputs(out_dir: Path, stem: str, results, suite: Suite, impls, meta: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    records = csv_records(results, suite, impls)
    with open(out_dir / f"{stem}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(records[0]) if records else ["work"])
        writer.writeheader()
        writer.writerows(records)
    (out_dir / f"{stem}.md").write_text(format_markdown(results, suite, impls, meta))


# ---------------------------------------------------------------------------------------------- CLI

def build_parser(found: list[tuple[str, Suite]]) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flashcore-bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--op", help="comma list of ops (default every op with suites: "
                   + ", ".join(dict.fromkeys(op for op, _ in found)) + ")")
    p.add_argument("--suite", help="comma list of suite names (default every suite of the ops: "
                   + ", ".join(f"{op}/{s.name}" for op, s in found) + ")")
    p.add_argument("--warmup-ms", type=float, default=25.0, help="warm-up per impl, ms of calls (default 25)")
    p.add_argument("--rep-ms", type=float, default=100.0, help="timed calls per impl, ms of calls (default 100)")
    p.add_argument("--rounds", type=int, default=3, help="device timing: rounds per impl, the impls in turns, each "
                   "with its own warm-up and a share of --rep-ms; the median round counts (default 3)")
    p.add_argument("--flush", choices=("write", "read"), help="L2 flush before each timed call (default: each "
                   "suite's; write: do_bench's zero_, read: a 256 MB read that leaves L2 clean)")
    p.add_argument("--out", default="bench_out", help="folder for the reports")
    p.add_argument("--list", action="store_true", help="print the suites and their cases and exit (no GPU needed)")
    p.add_argument("--plot", action="store_true", help="also draw <op>.<suite>.png (matplotlib: the bench extra)")
    p.add_argument("--replot", nargs="+", metavar="REPORT.json",
                   help="draw the plot of each saved report (<op>.<suite>.json) beside it and exit (no GPU needed)")
    for op, suite in found:
        suite.add_arguments(p.add_argument_group(f"{op}/{suite.name} ({suite.title})"))
    return p


def select(parser, args, found: list[tuple[str, Suite]]) -> list[Selected]:
    """The suites --op / --suite pick, with the cases and impls their options pick; usage errors exit."""
    wanted_ops = set(args.op.split(",")) if args.op else None
    wanted_suites = set(args.suite.split(",")) if args.suite else None
    for wanted, known, what in ((wanted_ops, {op for op, _ in found}, "op with suites"),
                                (wanted_suites, {s.name for _, s in found}, "suite")):
        if wanted and wanted - known:
            parser.error(f"no {what} {', '.join(sorted(wanted - known))}; known: {', '.join(sorted(known))}")
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    chosen = [(op, s) for op, s in found if (wanted_ops is None or op in wanted_ops)
              and (wanted_suites is None or s.name in wanted_suites)]
    if not chosen:
        parser.error("--op and --suite select no suite")
    try:
        return [Selected(op, s, s.cases(args), s.impls(args)) for op, s in chosen]
    except ValueError as exc:
        parser.error(str(exc))


def estimate_seconds(sel: Selected, args) -> float:
    """Rough wall time on an H100: per impl its timing and do_bench's overhead, per case the suite's setup."""
    if sel.suite.timing == "host":
        per_impl = (HOST_REPEATS + 2) * HOST_CALLS * 1e-4     # calls of up to 100 us
    else:
        per_impl = (args.rounds * args.warmup_ms + args.rep_ms) / 1e3 + 0.1 * args.rounds
    return len(sel.cases) * (len(sel.impls) * per_impl + sel.suite.setup_seconds(sel.impls))


def print_list(selected: list[Selected], args) -> None:
    for sel in selected:
        scale, work_unit, _ = UNITS[sel.suite.unit]
        print(f"{sel.op}/{sel.suite.name}: {sel.suite.title}")
        for n, case in enumerate(sel.cases, 1):
            work = f"  {case.work / scale:7.2f} {work_unit}" if sel.suite.timing == "device" else ""
            print(f"{n:3d}  {case.label:44}{work}".rstrip())
        print(f"{len(sel.cases)} cases x {len(sel.impls)} impls ({', '.join(sel.impls)}); "
              f"about {estimate_seconds(sel, args) / 60:.1f} min on an H100\n")


def run_meta(argv, args, suite: Suite) -> dict:
    import triton
    import flashcore
    return {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "none",
            "date": datetime.date.today().isoformat(), "torch": torch.__version__, "triton": triton.__version__,
            "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
            "flashcore": flashcore.__version__, "peers": suite.versions(), "unit": suite.unit,
            "timing": suite.timing, "command": " ".join(["flashcore-bench", *argv]),
            "warmup_ms": args.warmup_ms, "rep_ms": args.rep_ms, "rounds": args.rounds,
            "flush": flush_of(suite, args) if suite.timing == "device" else None}


def run_suite(sel: Selected, argv, args) -> tuple[list[dict], bool]:
    """Every case of one suite, reports rewritten after each; (results, interrupted)."""
    suite, out_dir = sel.suite, Path(args.out)
    meta, results, start, interrupted = run_meta(argv, args, suite), [], time.time(), False
    print(f"\n{sel.op}/{suite.name}: {meta['device']}  torch {meta['torch']}  triton {meta['triton']}  "
          f"{len(sel.cases)} cases -> {out_dir}", flush=True)
    try:
        for n, case in enumerate(sel.cases, 1):
            t0 = time.time()
            result = run_case(suite, case, sel.impls, args)
            results.append(result)
            timed = result["impls"]
            cells = "  ".join(f"{i} {_cell(timed[i])}" + (f" {timed[i]['mib']:.0f} MiB" if "mib" in timed[i] else "")
                              for i in sel.impls)
            ratios = "  ".join(f"{suite.ratios[c]} {_ratio(result['ratios'][c])}"
                               for c in _ratio_columns(suite, sel.impls))
            errors = "".join(f"\n    {i}: {r['error']}" for i, r in result["impls"].items() if "error" in r)
            print(f"[{n}/{len(sel.cases)}] {case.label} | {cells} | {ratios} | check {_check(result['check'])} "
                  f"({time.time() - t0:.1f}s)" + errors, flush=True)
            write_outputs(out_dir, sel.stem, results, suite, sel.impls, meta)
    except KeyboardInterrupt:
        print(f"\ninterrupted after {len(results)} of {len(sel.cases)} cases", flush=True)
        interrupted = True
    meta["wall_s"] = round(time.time() - start, 1)
    write_outputs(out_dir, sel.stem, results, suite, sel.impls, meta)
    if args.plot:
        from .bench_plot import plot_report
        plot_report({"meta": meta, "results": results}, out_dir / f"{sel.stem}.png", suite.title, suite.labels)
    print("\n" + format_table(results, suite, sel.impls) + "\n\n" + describe_cells(suite, meta)
          + f"\nWrote {out_dir}/{sel.stem}.json, .csv, .md{', .png' if args.plot else ''} ({meta['wall_s']} s)",
          flush=True)
    return results, interrupted


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    found = discover()
    parser = build_parser(found)
    args = parser.parse_args(argv)
    if args.replot:
        from .bench_plot import replot
        suites = {f"{op}.{suite.name}": suite for op, suite in found}
        try:
            for path in replot(args.replot, {stem: s.title for stem, s in suites.items()},
                               {stem: s.labels for stem, s in suites.items()}):
                print(f"wrote {path}")
        except (OSError, ValueError) as exc:
            parser.error(str(exc))
        return 0
    selected = select(parser, args, found)
    if args.list:
        print_list(selected, args)
        return 0
    if not torch.cuda.is_available():
        print("flashcore-bench: no CUDA device (use --list to see the cases)", file=sys.stderr)
        return 2
    wrong = False
    for sel in selected:
        results, interrupted = run_suite(sel, argv, args)
        wrong |= any((r["check"] or {}).get("status") in ("WRONG", "ERROR") for r in results)
        if interrupted:
            break
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
