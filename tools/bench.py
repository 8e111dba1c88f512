"""flashcore-bench: the prefill forward matrix, FlashCore against PyTorch's attention, in one process.

Shapes: B x S = 16384 tokens and H x D = 2048 for every case (H = 2048 // D), so each row is one batch of the
same work; plus a GQA case (Hq=32, Hkv=8, D=128). Peers, each timed on inputs already in its own layout:
PyTorch SDPA with one backend forced (cudnn, flash, efficient), FlexAttention (torch.compile, causal block mask
built outside timing) and flash-attn when importable. Latency is triton's do_bench median for the whole batch;
FLOPs are 4*B*H*Sq*Sk*D, halved when causal. FlashCore's output is checked against SDPA once per shape; a wrong
answer is flagged in the `check` column. A peer that fails on a shape is recorded (n/a) and the run goes on.

Usage:
    flashcore-bench --list                          # the cases, no GPU needed
    flashcore-bench --quick                         # smoke: bf16, D=128, S=1024/4096, causal and not, GQA
    flashcore-bench --out $OUT                      # the full matrix (96 cases, about 5 minutes on an H100)
    flashcore-bench --dtypes bf16 --head-dims 128 --seqlens 4096 --causal true --no-gqa --peers cudnn,flex

Writes bench.json, bench.csv and bench.md (a table to paste into BENCHMARKS.md) to --out after every case.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import json
import math
import re
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from flashcore import forward

TOKENS = 16384          # B x S, every case
HIDDEN = 2048           # H x D, every case
GQA_HEADS = (32, 8)     # (Hq, Hkv) of the GQA case, at D = 128
SEQLENS = (512, 1024, 2048, 4096, 8192, 16384)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
PEERS = ("cudnn", "flash", "efficient", "flex", "fa")
SDPA_BACKENDS = {"cudnn": "CUDNN_ATTENTION", "flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION"}
LABELS = {"flashcore": "FlashCore", "cudnn": "cuDNN", "flash": "SDPA-flash", "efficient": "SDPA-eff",
          "flex": "Flex", "fa": "flash-attn"}
QUICK = {"dtypes": "bf16", "head_dims": "128", "seqlens": "1024,4096"}
REL_TOL = 2e-2          # ||out - ref|| / ||ref||: bf16/fp16 rounding gives ~4e-3, a wrong kernel ~1


@dataclass(frozen=True)
class Case:
    dtype: str
    head_dim: int
    causal: bool
    batch: int
    heads_q: int
    heads_kv: int
    seqlen: int

    @property
    def flops(self) -> float:
        return forward.flops(self.batch, self.heads_q, self.seqlen, self.seqlen, self.head_dim, self.causal)

    def describe(self) -> str:
        return (f"{self.dtype} D={self.head_dim} {'causal' if self.causal else 'full':6} B={self.batch:<2} "
                f"H={self.heads_q}/{self.heads_kv} S={self.seqlen}")


def build_matrix(dtypes, head_dims, seqlens, causal_modes, gqa: bool) -> list[Case]:
    """Every (dtype, D, causal, S) at TOKENS tokens and H x D = HIDDEN, then the GQA cases for each dtype."""
    cases = []
    for dtype in dtypes:
        for head_dim in head_dims:
            heads = HIDDEN // head_dim
            cases += [Case(dtype, head_dim, c, TOKENS // s, heads, heads, s) for c in causal_modes for s in seqlens]
        if gqa:
            cases += [Case(dtype, 128, c, TOKENS // s, *GQA_HEADS, s) for c in causal_modes for s in seqlens]
    return cases


# ---------------------------------------------------------------------------------------------- running

def short_error(exc: BaseException, caught=()) -> str:
    """One line: the exception, and the first warning raised with it (SDPA puts its reasons there)."""
    lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()] or [""]
    text = f"{type(exc).__name__}: {lines[0]}"
    reasons = [re.sub(r"\s*\(Triggered internally at .*?\)", "", str(w.message)).strip() for w in caught]
    reasons = list(dict.fromkeys(r.splitlines()[0] for r in reasons if r))
    return (text + (f" ({' '.join(reasons)})" if reasons else ""))[:240]


def _causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def flash_attn_peer():
    """flash-attn's flash_attn_func, newest found (FA4 CuTe, FA3 Hopper, FA2), and its name, or (None, reason)."""
    for module in ("flash_attn.cute", "flash_attn_interface", "flash_attn"):
        try:
            mod = __import__(module, fromlist=["flash_attn_func"])
            return mod.flash_attn_func, f"{module} {getattr(mod, '__version__', '')}".strip()
        except Exception as exc:   # ImportError, or a wheel built for another torch
            reason = short_error(exc)
    return None, reason


def make_runner(name: str, case: Case, bshd, bhsd):
    """(fn, context) timing `name` on inputs already in its layout; may raise (the peer then records n/a)."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    gqa = case.heads_q != case.heads_kv
    if name == "flashcore":
        import flashcore
        return (lambda: flashcore.flash_attn_func(*bshd, causal=case.causal)), contextlib.nullcontext
    if name in SDPA_BACKENDS:
        extra = {"enable_gqa": True} if gqa else {}
        return ((lambda: F.scaled_dot_product_attention(*bhsd, is_causal=case.causal, **extra)),
                lambda: sdpa_kernel(getattr(SDPBackend, SDPA_BACKENDS[name])))
    if name == "flex":
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        torch._dynamo.reset()     # one compiled graph per case: no recompile limit, no dynamic shapes
        mask = (create_block_mask(_causal, None, None, case.seqlen, case.seqlen, device="cuda")
                if case.causal else None)
        compiled = torch.compile(flex_attention, dynamic=False)
        return (lambda: compiled(*bhsd, block_mask=mask, enable_gqa=gqa)), contextlib.nullcontext
    if name == "fa":
        fa, why = flash_attn_peer()
        if fa is None:
            raise RuntimeError(why)
        return (lambda: fa(*bshd, causal=case.causal)), contextlib.nullcontext
    raise ValueError(f"unknown implementation {name!r}")


def time_impl(name: str, case: Case, bshd, bhsd, warmup_ms: float, rep_ms: float) -> dict:
    """{'ms', 'tflops'} or {'error'}: one checked call (compiles), then do_bench's median."""
    from triton.testing import do_bench
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn, context = make_runner(name, case, bshd, bhsd)
            with context():
                fn()
                torch.cuda.synchronize()
                ms = do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")
    except Exception as exc:
        if isinstance(exc, torch.cuda.OutOfMemoryError):
            torch.cuda.empty_cache()
        return {"error": short_error(exc, caught)}
    return {"ms": ms, "tflops": case.flops / (ms * 1e-3) / 1e12}


def check_flashcore(case: Case, bshd, bhsd) -> dict:
    """FlashCore's output against the first SDPA backend that runs (cuDNN, flash, efficient, math)."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    import flashcore
    try:
        out = flashcore.flash_attn_func(*bshd, causal=case.causal).float()
    except Exception as exc:
        return {"status": "ERROR", "error": short_error(exc)}
    for backend in ("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH"):
        try:
            with warnings.catch_warnings(), sdpa_kernel(getattr(SDPBackend, backend)):
                warnings.simplefilter("ignore")
                ref = F.scaled_dot_product_attention(*bhsd, is_causal=case.causal,
                                                     enable_gqa=case.heads_q != case.heads_kv)
        except Exception:
            continue
        diff = out - ref.transpose(1, 2).float()
        rel = (diff.norm() / ref.float().norm()).item()
        ok = math.isfinite(rel) and rel <= REL_TOL
        return {"status": "ok" if ok else "WRONG", "ref": backend.split("_")[0].lower(),
                "max_err": diff.abs().max().item(), "rel_err": rel}
    return {"status": "no ref"}


def run_case(case: Case, impls, warmup_ms: float, rep_ms: float) -> dict:
    """Fresh random inputs (both layouts made before timing), FlashCore checked, every impl timed."""
    torch.manual_seed(0)
    dtype = DTYPES[case.dtype]
    shape_q = (case.batch, case.seqlen, case.heads_q, case.head_dim)
    shape_kv = (case.batch, case.seqlen, case.heads_kv, case.head_dim)
    bshd = [torch.randn(s, device="cuda", dtype=dtype) for s in (shape_q, shape_kv, shape_kv)]
    bhsd = [t.transpose(1, 2).contiguous() for t in bshd]
    result = {**asdict(case), "gflop": case.flops / 1e9, "check": check_flashcore(case, bshd, bhsd)}
    result["impls"] = {name: time_impl(name, case, bshd, bhsd, warmup_ms, rep_ms) for name in impls}
    del bshd, bhsd
    torch.cuda.empty_cache()
    return add_ratios(result)


def add_ratios(result: dict) -> dict:
    """best_peer, vs_best and vs_cudnn: FlashCore's throughput over the peer's (> 1: FlashCore is faster)."""
    impls = result["impls"]
    fc = impls.get("flashcore", {}).get("ms")
    peers = {n: r["ms"] for n, r in impls.items() if n != "flashcore" and "ms" in r}
    best = min(peers, key=peers.get) if peers else None
    result["best_peer"] = best
    result["vs_best"] = peers[best] / fc if fc and best else None
    result["vs_cudnn"] = peers["cudnn"] / fc if fc and "cudnn" in peers else None
    return result


# ---------------------------------------------------------------------------------------------- output

def _cell(r: dict) -> str:
    return f"{r['ms']:.3f} / {r['tflops']:.0f}" if "ms" in r else "n/a"


def _ratio(x) -> str:
    return f"{x:.2f}" if x is not None else "-"


def _check(c: dict) -> str:   # the status, with the error size when wrong
    return c["status"] if c["status"] != "WRONG" else f"WRONG rel={c['rel_err']:.1e}"


def table_rows(results, impls) -> tuple[list[str], list[list[str]]]:
    head = ["dtype", "D", "causal", "B", "H q/kv", "S"] + [f"{LABELS[i]} ms/TF" for i in impls]
    head += ["FC/best", "best", "FC/cuDNN", "check"]
    rows = [[r["dtype"], str(r["head_dim"]), "yes" if r["causal"] else "no", str(r["batch"]),
             f"{r['heads_q']}/{r['heads_kv']}", str(r["seqlen"])] + [_cell(r["impls"].get(i, {})) for i in impls]
            + [_ratio(r["vs_best"]), LABELS.get(r["best_peer"], "-"), _ratio(r["vs_cudnn"]), _check(r["check"])]
            for r in results]
    return head, rows


def format_table(results, impls) -> str:
    """Fixed-width text table, one row per shape."""
    head, rows = table_rows(results, impls)
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    lines = ["  ".join(x.rjust(w) for x, w in zip(line, widths)) for line in [head] + rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_markdown(results, impls, meta: dict) -> str:
    """The table for BENCHMARKS.md, with the card, date, versions and command line on top."""
    head, rows = table_rows(results, impls)
    lines = [f"### Prefill forward: {meta['device']}, {meta['date']}", "",
             f"torch {meta['torch']}, triton {meta['triton']}, cuDNN {meta['cudnn']}, "
             f"flashcore {meta['flashcore']}, flash-attn: {meta['flash_attn']}.  ",
             f"Command: `{meta['command']}`  ",
             f"Cells: median ms / TFLOP/s (do_bench, warmup {meta['warmup_ms']} ms, rep {meta['rep_ms']} ms), "
             f"B x S = {TOKENS} tokens, H x D = {HIDDEN}; FLOPs 4*B*H*S*S*D, halved when causal. "
             "FC/best, FC/cuDNN: FlashCore's throughput over the peer's (> 1: FlashCore faster). "
             "check: FlashCore's output against SDPA.", "",
             "| " + " | ".join(head) + " |", "|" + "|".join("---:" for _ in head) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def csv_records(results, impls) -> list[dict]:
    """Flat rows: the case, then ms / tflops / error per impl, then the ratios and the check."""
    records = []
    for r in results:
        rec = {k: r[k] for k in ("dtype", "head_dim", "causal", "batch", "heads_q", "heads_kv", "seqlen", "gflop")}
        for i in impls:
            got = r["impls"].get(i, {})
            rec.update({f"{i}_ms": got.get("ms"), f"{i}_tflops": got.get("tflops"), f"{i}_error": got.get("error")})
        rec.update(best_peer=r["best_peer"], vs_best=r["vs_best"], vs_cudnn=r["vs_cudnn"],
                   check=r["check"]["status"], max_err=r["check"].get("max_err"), rel_err=r["check"].get("rel_err"))
        records.append(rec)
    return records


def write_outputs(out_dir: Path, results, impls, meta: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    records = csv_records(results, impls)
    with open(out_dir / "bench.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(records[0]) if records else ["dtype"])
        writer.writeheader()
        writer.writerows(records)
    (out_dir / "bench.md").write_text(format_markdown(results, impls, meta))


# ---------------------------------------------------------------------------------------------- CLI

def parse_args(argv):
    p = argparse.ArgumentParser(prog="flashcore-bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--dtypes", help="comma list of bf16, fp16 (default both)")
    p.add_argument("--head-dims", help="comma list (default 64,128,256)")
    p.add_argument("--seqlens", help=f"comma list (default {','.join(map(str, SEQLENS))})")
    p.add_argument("--causal", choices=("both", "true", "false"), default="both")
    p.add_argument("--gqa", action=argparse.BooleanOptionalAction, default=True, help="the Hq=32/Hkv=8 cases")
    p.add_argument("--peers", default=",".join(PEERS), help="comma list of " + ", ".join(PEERS) +
                   " (default all; flash-attn only if importable); 'none' times FlashCore alone")
    p.add_argument("--warmup-ms", type=float, default=25.0, help="do_bench warm-up per impl (default 25)")
    p.add_argument("--rep-ms", type=float, default=100.0, help="do_bench repeats per impl (default 100)")
    p.add_argument("--out", default="bench_out", help="folder for bench.json / bench.csv / bench.md")
    p.add_argument("--quick", action="store_true", help="smoke subset: " + ", ".join(QUICK.values()))
    p.add_argument("--list", action="store_true", help="print the cases and exit (no GPU needed)")
    args = p.parse_args(argv)
    for key, value in QUICK.items():
        if args.quick and getattr(args, key) is None:
            setattr(args, key, value)
    args.dtypes = (args.dtypes or "bf16,fp16").split(",")
    args.head_dims = [int(x) for x in (args.head_dims or "64,128,256").split(",")]
    args.seqlens = [int(x) for x in args.seqlens.split(",")] if args.seqlens else list(SEQLENS)
    args.peers = [] if args.peers == "none" else [x for x in args.peers.split(",") if x]
    for bad in [d for d in args.dtypes if d not in DTYPES] + [x for x in args.peers if x not in PEERS]:
        p.error(f"unknown dtype or peer {bad!r}")
    if any(HIDDEN % d or TOKENS % s for d in args.head_dims for s in args.seqlens):
        p.error(f"head dims must divide {HIDDEN} and seqlens {TOKENS}")
    args.causal_modes = {"both": (False, True), "true": (True,), "false": (False,)}[args.causal]
    return args


def estimate_seconds(cases, impls, warmup_ms: float, rep_ms: float) -> float:
    """Rough wall time: per impl warm-up + repeats + do_bench's overhead, plus torch.compile of flex per case."""
    per_case = len(impls) * ((warmup_ms + rep_ms) / 1e3 + 0.1) + (1.8 if "flex" in impls else 0.5)
    return 15.0 + len(cases) * per_case   # calibrated on an H100: 96 cases, 5 impls, 10/40 ms took 248 s


def run_meta(argv, args) -> dict:
    import triton
    import flashcore
    fa, fa_name = flash_attn_peer()
    return {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "none",
            "date": datetime.date.today().isoformat(), "torch": torch.__version__, "triton": triton.__version__,
            "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
            "flashcore": flashcore.__version__, "flash_attn": fa_name if fa else "not installed",
            "command": " ".join(["flashcore-bench", *argv]), "warmup_ms": args.warmup_ms, "rep_ms": args.rep_ms}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    cases = build_matrix(args.dtypes, args.head_dims, args.seqlens, args.causal_modes, args.gqa)
    if "fa" in args.peers and flash_attn_peer()[0] is None:
        print("flash-attn not importable: skipped", flush=True)
        args.peers.remove("fa")
    impls = ["flashcore", *args.peers]
    if args.list:
        for n, case in enumerate(cases, 1):
            print(f"{n:3d}  {case.describe():44}  {case.flops / 1e12:7.2f} TFLOP")
        print(f"{len(cases)} cases x {len(impls)} impls ({', '.join(impls)}); "
              f"about {estimate_seconds(cases, impls, args.warmup_ms, args.rep_ms) / 60:.1f} min on an H100")
        return 0
    if not torch.cuda.is_available():
        print("flashcore-bench: no CUDA device (use --list to see the cases)", file=sys.stderr)
        return 2
    meta, results, out_dir, start = run_meta(argv, args), [], Path(args.out), time.time()
    print(f"{meta['device']}  torch {meta['torch']}  triton {meta['triton']}  {len(cases)} cases -> {out_dir}",
          flush=True)
    try:
        for n, case in enumerate(cases, 1):
            t0 = time.time()
            result = run_case(case, impls, args.warmup_ms, args.rep_ms)
            results.append(result)
            cells = "  ".join(f"{i} {_cell(result['impls'][i])}" for i in impls)
            errors = "".join(f"\n    {i}: {r['error']}" for i, r in result["impls"].items() if "error" in r)
            print(f"[{n}/{len(cases)}] {case.describe()} | {cells} | FC/best {_ratio(result['vs_best'])} "
                  f"FC/cuDNN {_ratio(result['vs_cudnn'])} check {_check(result['check'])} ({time.time() - t0:.1f}s)"
                  + errors, flush=True)
            write_outputs(out_dir, results, impls, meta)
    except KeyboardInterrupt:
        print(f"\ninterrupted after {len(results)} of {len(cases)} cases", flush=True)
    meta["wall_s"] = round(time.time() - start, 1)
    write_outputs(out_dir, results, impls, meta)
    print("\n" + format_table(results, impls) + "\n\nFC/best, FC/cuDNN: FlashCore's throughput over the peer's; "
          f"cells: ms / TFLOP/s.  Wrote {out_dir}/bench.json, bench.csv, bench.md ({meta['wall_s']} s)")
    return 1 if any(r["check"]["status"] in ("WRONG", "ERROR") for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
