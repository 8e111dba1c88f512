"""attn_fwd's suites for flashcore-bench: the prefill matrix and the host overhead of one eager call.

prefill  B x S = 16384 tokens and H x D = 2048 for every case (H = 2048 // D), so each row is one batch of the
         same work; plus a GQA case (Hq=32, Hkv=8, D=128). Peers, each timed on inputs already in its own layout:
         PyTorch SDPA with one backend forced (cudnn, flash, efficient), FlexAttention (torch.compile, causal block
         mask built outside timing) and flash-attn when importable. `default` is FlashCore again with the op's
         heuristic default config (same process, same inputs): the tuned/default column is what tuning buys.
host     B=1 S=1, B=1 S=128, B=8 S=512 at Hq=Hkv=32, D=128, bf16, causal and not: flash_attn_func against SDPA
         (PyTorch's own backend choice), eager, per call: CPU time to issue it and its latency.

FlashCore's output is checked once per case against the float64 reference (flashcore/reference.py), on
the first and last query rows of the batch's first sequence.

    flashcore-bench --suite prefill --quick       # smoke: bf16, D=128, S=1024/4096, causal and not, GQA
    flashcore-bench --suite prefill --out $OUT    # the full matrix (96 cases)
    flashcore-bench --suite prefill --dtypes bf16 --head-dims 128 --seqlens 4096 --causal true --no-gqa
    flashcore-bench --suite host --out $OUT
"""
from __future__ import annotations

import argparse
from typing import Callable

import torch

from flashcore.reference import max_error
from flashcore.tools.bench_suite import Case, Prepared, Suite, or_failing, verdict

from . import OP, host
from .call import AttnFwdCall

TOKENS = 16384          # B x S, every prefill case
HIDDEN = 2048           # H x D, every prefill case
GQA_HEADS = (32, 8)     # (Hq, Hkv) of the GQA cases, at D = 128
SEQLENS = (512, 1024, 2048, 4096, 8192, 16384)
HEAD_DIMS = (64, 128, 256)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
PEERS = ("cudnn", "flash", "efficient", "flex", "fa")
SDPA_BACKENDS = {"cudnn": "CUDNN_ATTENTION", "flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION"}
LABELS = {"flashcore": "FlashCore", "default": "FC-default", "cudnn": "cuDNN", "flash": "SDPA-flash",
          "efficient": "SDPA-eff", "flex": "Flex", "fa": "flash-attn", "sdpa": "SDPA"}
QUICK = {"dtypes": "bf16", "head_dims": "128", "seqlens": "1024,4096"}
CHECK_ROWS = 64         # query rows per end of the sequence checked against the float64 reference
HOST_SHAPES = ((1, 1), (1, 128), (8, 512))   # (B, S) of the host-overhead cases
HOST_HEADS, HOST_HEAD_DIM = 32, 128


def case_of(call: AttnFwdCall) -> Case:
    """The table row of a self-attention call (seqlen_q == seqlen_k)."""
    columns = (("dtype", call.dtype), ("D", str(call.head_dim)), ("causal", "yes" if call.causal else "no"),
               ("B", str(call.batch)), ("H q/kv", f"{call.heads_q}/{call.heads_kv}"), ("S", str(call.seqlen_q)))
    label = (f"{call.dtype} D={call.head_dim} {'causal' if call.causal else 'full':6} B={call.batch:<2} "
             f"H={call.heads_q}/{call.heads_kv} S={call.seqlen_q}")
    return Case(call, columns, label, work=call.flops)


def build_matrix(dtypes, head_dims, seqlens, causal_modes, gqa: bool) -> list[AttnFwdCall]:
    """Every (dtype, D, causal, S) at TOKENS tokens and H x D = HIDDEN, then the GQA cases for each dtype."""
    calls = []
    for dtype in dtypes:
        for head_dim in head_dims:
            heads = HIDDEN // head_dim
            calls += [AttnFwdCall(TOKENS // s, s, s, heads, heads, head_dim, dtype, c)
                      for c in causal_modes for s in seqlens]
        if gqa:
            calls += [AttnFwdCall(TOKENS // s, s, s, *GQA_HEADS, 128, dtype, c) for c in causal_modes for s in seqlens]
    return calls


# ---------------------------------------------------------------------------------------------- impls

def make_inputs(call: AttnFwdCall):
    """(q, k, v) in flash-attn's (B, S, H, D) layout and the same values in SDPA's (B, H, S, D), both contiguous."""
    dtype = DTYPES[call.dtype]
    shape_q = (call.batch, call.seqlen_q, call.heads_q, call.head_dim)
    shape_kv = (call.batch, call.seqlen_k, call.heads_kv, call.head_dim)
    bshd = [torch.randn(s, device="cuda", dtype=dtype) for s in (shape_q, shape_kv, shape_kv)]
    bhsd = [t.transpose(1, 2).contiguous() for t in bshd]
    return bshd, bhsd


def flashcore_tuned(call: AttnFwdCall, bshd):
    """The public call, with the config dispatch picks (tuning DB, bundle, nearest bucket or default)."""
    import flashcore
    return lambda: flashcore.flash_attn_func(*bshd, causal=call.causal)


def flashcore_default(call: AttnFwdCall, bshd):
    """The op's host function with the heuristic default config (FLASHCORE_TUNING=off cannot be used: it is read
    once per process), arguments as flash_attn_func passes them (causal folded into window_right = 0)."""
    q, k, v = bshd
    config = OP.default_config(host.make_spec(q, k, v, call.causal, False, False))
    scale = call.head_dim ** -0.5
    window_right = 0 if call.causal else -1
    return lambda: host.attention_forward(q, k, v, scale, call.causal, -1, window_right, 0.0, False, config=config)


def sdpa(call: AttnFwdCall, bhsd, backend: str | None = None):
    """F.scaled_dot_product_attention on (B, H, S, D) inputs; `backend` (cudnn, flash, efficient) forces one,
    None leaves the choice to PyTorch. A backend that cannot take the case raises on the call (n/a)."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    extra = {"enable_gqa": True} if call.heads_q != call.heads_kv else {}
    if backend is None:
        return lambda: F.scaled_dot_product_attention(*bhsd, is_causal=call.causal, **extra)
    forced = getattr(SDPBackend, SDPA_BACKENDS[backend])

    def run():
        # entered per call: its few microseconds of host time hide behind the prefill kernels (>= 0.1 ms)
        # while do_bench times the GPU
        with sdpa_kernel(forced):
            return F.scaled_dot_product_attention(*bhsd, is_causal=call.causal, **extra)
    return run


def _causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def flex(call: AttnFwdCall, bhsd):
    """FlexAttention compiled for this case alone, the causal block mask built here, outside timing."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    torch._dynamo.reset()     # one compiled graph per case: no recompile limit, no dynamic shapes
    mask = (create_block_mask(_causal, None, None, call.seqlen_q, call.seqlen_k, device="cuda")
            if call.causal else None)
    compiled = torch.compile(flex_attention, dynamic=False)
    gqa = call.heads_q != call.heads_kv
    return lambda: compiled(*bhsd, block_mask=mask, enable_gqa=gqa)


def flash_attn_peer():
    """flash-attn's flash_attn_func, newest found (FA4 CuTe, FA3 Hopper, FA2), and its name, or (None, reason)."""
    reason = ""
    for module in ("flash_attn.cute", "flash_attn_interface", "flash_attn"):
        try:
            mod = __import__(module, fromlist=["flash_attn_func"])
            return mod.flash_attn_func, f"{module} {getattr(mod, '__version__', '')}".strip()
        except Exception as exc:   # ImportError, or a wheel built for another torch
            reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    return None, reason


def flash_attn(call: AttnFwdCall, bshd):
    fa, why = flash_attn_peer()
    if fa is None:
        raise RuntimeError(why)
    return lambda: fa(*bshd, causal=call.causal)


def check_against_reference(call: AttnFwdCall, bshd, run: Callable[[], torch.Tensor]) -> dict:
    """FlashCore's output for the whole batch (from `run`, the timed call); its first and last CHECK_ROWS query rows
    of batch 0 against the float64 reference with the shared tolerance rule (flashcore/reference.py). A float64
    reference of a whole 16k-token batch would not fit in memory. The last rows see the most keys; with causal, the
    first rows see only the first keys, so they are checked against those (the reference aligns its mask
    bottom-right)."""
    q, k, v = bshd
    out = run()
    rows = min(CHECK_ROWS, call.seqlen_q)
    first_keys = slice(0, rows) if call.causal else slice(None)
    return verdict(max_error(out[:1, sel], q[:1, sel], k[:1, keys], v[:1, keys], causal=call.causal)
                   for sel, keys in ((slice(0, rows), first_keys), (slice(-rows, None), slice(None))))


class _AttnSuite(Suite):
    """Both suites: self-attention cases, inputs in both layouts, every impl above by name."""
    labels = LABELS

    def setup(self, case: Case, impls: list[str]) -> Prepared:
        call = case.call
        bshd, bhsd = make_inputs(call)
        builders = {"flashcore": lambda: flashcore_tuned(call, bshd), "default": lambda: flashcore_default(call, bshd),
                    "sdpa": lambda: sdpa(call, bhsd), "flex": lambda: flex(call, bhsd),
                    "fa": lambda: flash_attn(call, bshd),
                    **{b: (lambda b=b: sdpa(call, bhsd, b)) for b in SDPA_BACKENDS}}
        fns = {name: or_failing(builders[name]) for name in impls}
        return Prepared(fns, check=lambda: check_against_reference(call, bshd, fns["flashcore"]))


class Prefill(_AttnSuite):
    name = "prefill"
    title = "Prefill forward"
    notes = (f"B x S = {TOKENS} tokens, H x D = {HIDDEN}; FLOPs 4*B*Hq*S*S*D, halved when causal. "
             "FC/best, FC/cuDNN: against the fastest peer and cuDNN; tuned/default: FlashCore with dispatch's config "
             "over FlashCore with the heuristic default (1.00 where dispatch serves the default). "
             "check: FlashCore's output against the float64 reference.")
    variants = ("default",)
    ratios = {"best": "FC/best", "cudnn": "FC/cuDNN", "default": "tuned/default"}

    def add_arguments(self, group) -> None:
        group.add_argument("--dtypes", help="comma list of bf16, fp16 (default both)")
        group.add_argument("--head-dims", help=f"comma list (default {','.join(map(str, HEAD_DIMS))})")
        group.add_argument("--seqlens", help=f"comma list (default {','.join(map(str, SEQLENS))})")
        group.add_argument("--causal", choices=("both", "true", "false"), default="both")
        group.add_argument("--gqa", action=argparse.BooleanOptionalAction, default=True, help="the Hq=32/Hkv=8 cases")
        group.add_argument("--peers", default=",".join(PEERS), help="comma list of " + ", ".join(PEERS) +
                           " (default all; flash-attn only if importable); 'none' times FlashCore alone")
        group.add_argument("--default", action=argparse.BooleanOptionalAction, default=True,
                           help="also time FlashCore's heuristic default config (the tuned/default column)")
        group.add_argument("--quick", action="store_true", help="smoke subset: " + ", ".join(QUICK.values()))

    def cases(self, args) -> list[Case]:
        chosen = {key: getattr(args, key) or (QUICK[key] if args.quick else None) for key in QUICK}
        dtypes = (chosen["dtypes"] or ",".join(DTYPES)).split(",")
        head_dims = [int(x) for x in chosen["head_dims"].split(",")] if chosen["head_dims"] else list(HEAD_DIMS)
        seqlens = [int(x) for x in chosen["seqlens"].split(",")] if chosen["seqlens"] else list(SEQLENS)
        if any(d not in DTYPES for d in dtypes):
            raise ValueError(f"--dtypes: each one of {', '.join(DTYPES)}, got {','.join(dtypes)}")
        if any(HIDDEN % d or TOKENS % s for d in head_dims for s in seqlens):
            raise ValueError(f"--head-dims must divide {HIDDEN} and --seqlens {TOKENS}")
        causal_modes = {"both": (False, True), "true": (True,), "false": (False,)}[args.causal]
        return [case_of(call) for call in build_matrix(dtypes, head_dims, seqlens, causal_modes, args.gqa)]

    def impls(self, args) -> list[str]:
        peers = [] if args.peers == "none" else [x for x in args.peers.split(",") if x]
        unknown = [x for x in peers if x not in PEERS]
        if unknown:
            raise ValueError(f"--peers: unknown {', '.join(unknown)}; known: {', '.join(PEERS)}")
        if "fa" in peers and flash_attn_peer()[0] is None:
            print("flash-attn not importable: skipped", flush=True)
            peers.remove("fa")
        return ["flashcore", *(["default"] if args.default else []), *peers]

    def versions(self) -> dict[str, str]:
        fa, name = flash_attn_peer()
        return {"flash-attn": name if fa else "not installed"}

    def setup_seconds(self, impls: list[str]) -> float:
        # calibrated on an H100: 96 cases, 5 impls, 10/40 ms do_bench took 248 s, most of the rest flex's compile
        return 1.8 if "flex" in impls else 0.5


class HostOverhead(_AttnSuite):
    name = "host"
    title = "Host overhead of one eager call"
    timing = "host"
    notes = (f"Hq = Hkv = {HOST_HEADS}, D = {HOST_HEAD_DIM}, bf16. FlashCore: flash_attn_func on (B, S, H, D) "
             "inputs; SDPA: F.scaled_dot_product_attention on (B, H, S, D) inputs, PyTorch's backend choice. "
             "Floor: FC/SDPA host <= 1.5. check: FlashCore's output against the float64 reference.")
    ratios = {"sdpa": "FC/SDPA host"}

    def cases(self, args) -> list[Case]:
        return [case_of(AttnFwdCall(b, s, s, HOST_HEADS, HOST_HEADS, HOST_HEAD_DIM, "bf16", causal))
                for b, s in HOST_SHAPES for causal in (False, True)]

    def impls(self, args) -> list[str]:
        return ["flashcore", "sdpa"]

    def setup_seconds(self, impls: list[str]) -> float:
        return 1.0


SUITES = [Prefill(), HostOverhead()]
