"""attn_bwd's suites for flashcore-bench: flash_attn_func's backward over attn_fwd's prefill matrix, FlashCore against
its peers, every implementation in the same run on the same values.

backward  the backward alone: each impl's forward runs once in setup on inputs that require grad (its graph and
          saved tensors stay alive); the timed call is torch.autograd.grad(out, inputs, dout, retain_graph=True),
          which runs the backward graph only. Work: 2.5x the forward's FLOPs (five matmuls to its two).
fwd-bwd   forward + backward per call: the forward, then torch.autograd.grad of its output. Work: 3.5x.

Cases: attn_fwd's prefill matrix (B x S = 16384 tokens, H x D = 2048, causal and not, plus GQA Hq 32 / Hkv 8 at
D 128), bf16 and S 1024..16384 by default (40 cases a suite; --bwd-dtypes bf16,fp16 and --bwd-seqlens 512,... add the
rest). Forward FLOPs as attn_fwd counts them: 4*B*Hq*S*S*D, halved when causal.

Implementations, each differentiated by autograd the same way, on inputs in its own layout built outside timing:
    flashcore  flashcore.flash_attn_func, forward and backward with the configs dispatch picks
    default    FlashCore through an autograd.Function calling the ops' host functions with each op's heuristic default
               config (the tuned/default column: what tuning buys)
    cudnn, flash, efficient   F.scaled_dot_product_attention, that backend forced for the forward; autograd records
               the backend's own backward
    flex       FlexAttention compiled (torch.compile: forward and, through AOTAutograd, backward), the causal block
               mask built in setup
    fa         flash-attn's flash_attn_func, the newest importable (FA4 flash_attn.cute, FA3, FA2), as attn_fwd's
A peer that cannot run a case is n/a, with its reason.

Peak memory (the "MiB" columns, the harness's Suite.memory): what one timed call allocates at its peak beyond what
was allocated before it. In `backward`: the backward's own (gradients, workspaces), the forward's saved tensors
already alive; in `fwd-bwd` the forward's saved tensors count too.

FlashCore's gradients (from the timed call) are checked once per case: dq, dk, dv finite over the whole batch, and on
batch 0's first and last KV heads (with the query heads reading them) against float64 autograd of
flashcore.reference.attention_ref over the whole sequence, query rows in chunks (exact: chunked_reference), with the
tests' rule (reference.grad_errors): 4x what the same reference loses in the inputs' dtype, plus a floor scaled by
the gradient's size.

Runtime on an H100: the floor's 8 MHA cases (`benchmarks/device.sh bwd`: --suite backward, 6 impls, --warmup-ms 10
--rep-ms 40) took 52 s with flex's compiles (2026-12-07). The default 40 cases with every peer, estimated from
that: about 4-6 min per suite at the harness's default timing, so give each suite its own 10-minute device call
(--suite backward, --suite fwd-bwd).

    flashcore-bench --op attn_bwd --list
    flashcore-bench --op attn_bwd --bwd-quick --out $OUT                  # smoke: bf16, D 128, S 2048 / 8192, GQA
    flashcore-bench --op attn_bwd --suite backward --out $OUT             # the default matrix (40 cases)
    flashcore-bench --op attn_bwd --bwd-head-dims 128 --bwd-seqlens 2048,4096,8192,16384 \\
        --bwd-peers cudnn,flash,flex,fa --out $OUT                        # the floors' cases
"""
from __future__ import annotations

import argparse
import dataclasses
import math
from typing import Any, Callable

import torch

from torch.utils.checkpoint import checkpoint

from flashcore.device import arch
from flashcore.reference import attention_ref, grad_errors
from flashcore.tools.bench_suite import Case, Prepared, Suite, or_failing, verdict

from ..attn_fwd import OP as FWD_OP
from ..attn_fwd import bench as fwd_bench
from ..attn_fwd import host as fwd_host
from ..attn_fwd.bench import DTYPES, HIDDEN, LABELS, PEERS, SDPA_BACKENDS, TOKENS
from ..attn_fwd.call import AttnFwdCall
from . import OP, host
from .call import AttnBwdCall

DEFAULTS = {"dtypes": "bf16", "head_dims": "64,128,256", "seqlens": "1024,2048,4096,8192,16384"}
QUICK = {"dtypes": "bf16", "head_dims": "128", "seqlens": "2048,8192"}
BHSD = ("flex", *SDPA_BACKENDS)     # impls on SDPA's (B, H, S, D) layout; the others take (B, S, H, D)
CHECK_ELEMENTS = 2**25              # (row, key, head) scores per chunk of the reference: 256 MiB a float64 tensor


# ---------------------------------------------------------------------------------------------- impls

class _DefaultConfigs(torch.autograd.Function):
    """flash_attn_func without window, softcap or ALiBi, through the ops' host functions with the configs given:
    FlashCore's forward and backward as the public call runs them, only the configs forced."""

    @staticmethod
    def forward(ctx, q, k, v, causal: bool, fwd_config: dict, bwd_config: dict, dq_atomic: bool):
        scale, window_right = q.shape[-1] ** -0.5, 0 if causal else -1
        out, lse = fwd_host.attention_forward(q, k, v, scale, causal, -1, window_right, 0.0, True, config=fwd_config)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.options = (scale, causal, -1, window_right, 0.0)
        ctx.bwd_config, ctx.dq_atomic = bwd_config, dq_atomic
        return out

    @staticmethod
    def backward(ctx, dout):
        dq, dk, dv = host.attention_backward(dout, *ctx.saved_tensors, *ctx.options, dq_atomic=ctx.dq_atomic,
                                             config=ctx.bwd_config)
        return dq, dk, dv, None, None, None, None


def flashcore_default(call: AttnFwdCall, bshd):
    """FlashCore with each op's heuristic default config (FLASHCORE_TUNING=off cannot be used: it is read once per
    process); the specs as the runtime builds them (attn_bwd's: host._spec's)."""
    q, k, v = bshd
    fwd_config = FWD_OP.default_config(fwd_host.make_spec(q, k, v, call.causal, False, False))
    cc = arch(q.device.index or 0) if q.is_cuda else 0
    atomic = host.dq_atomic_for(False, q)                 # flash-attn's default, deterministic=False
    bwd_config = OP.default_config(host.spec_of(host.call_of(q, k, call.causal, False, False, False, atomic), cc))
    return lambda: _DefaultConfigs.apply(q, k, v, call.causal, fwd_config, bwd_config, atomic)


def forward_builders(call: AttnFwdCall, bshd, bhsd) -> dict[str, Callable[[], Callable[[], Any]]]:
    """impl -> a builder of its forward callable on the inputs in its layout (attn_fwd's builders)."""
    return {"flashcore": lambda: fwd_bench.flashcore_tuned(call, bshd),
            "default": lambda: flashcore_default(call, bshd), "flex": lambda: fwd_bench.flex(call, bhsd),
            "fa": lambda: fwd_bench.flash_attn(call, bshd),
            **{b: (lambda b=b: fwd_bench.sdpa(call, bhsd, b)) for b in SDPA_BACKENDS}}


def output_of(result) -> torch.Tensor:
    """The attention output of a forward's result (flash-attn 4 returns (out, lse))."""
    return result[0] if isinstance(result, tuple) else result


def backward_only(forward: Callable[[], Any], inputs, dout) -> Callable[[], tuple]:
    """The backward alone: `forward` runs once, here; each call runs its backward graph again (retain_graph keeps
    the saved tensors) and returns the gradients of `inputs`."""
    out = output_of(forward())
    return lambda: torch.autograd.grad(out, inputs, dout, retain_graph=True)


def forward_backward(forward: Callable[[], Any], inputs, dout) -> Callable[[], tuple]:
    """Forward + backward: each call runs `forward`, then the backward of its output (the graph freed after)."""
    return lambda: torch.autograd.grad(output_of(forward()), inputs, dout)


def timed_calls(call: AttnFwdCall, bshd, bhsd, dout, impls: list[str], alone: bool) -> dict[str, Callable[[], tuple]]:
    """impl -> its timed call, returning (dq, dk, dv) in its layout: backward_only (`alone`) or forward_backward of
    its forward, on inputs that require grad; dout is in (B, S, H, D), copied to (B, H, S, D) for the SDPA layout.
    An impl whose forward fails here (backward_only runs it) is n/a."""
    builders = forward_builders(call, bshd, bhsd)
    dout_bhsd = dout.transpose(1, 2).contiguous()
    timed = backward_only if alone else forward_backward

    def build(name):
        inputs, grad = (bhsd, dout_bhsd) if name in BHSD else (bshd, dout)
        return timed(builders[name](), inputs, grad)
    return {name: or_failing(lambda name=name: build(name)) for name in impls}


# ---------------------------------------------------------------------------------------------- the check

def checked_heads(call: AttnFwdCall) -> tuple[list[int], list[int]]:
    """(query heads, KV heads) the check compares: the first and last KV heads and the query heads that read them
    (a KV head's dk and dv sum over its query heads)."""
    group = call.heads_q // call.heads_kv
    kv_heads = sorted({0, call.heads_kv - 1})
    return [h for g in kv_heads for h in range(g * group, (g + 1) * group)], kv_heads


def chunked_reference(q, k, v, causal: bool = False, compute_dtype=torch.float64, upcast_output: bool = True):
    """attention_ref's (out, None) for self-attention (Sq == Sk), its query rows in chunks of about CHECK_ELEMENTS
    scores, each under torch.utils.checkpoint: autograd of a 16k sequence then holds one chunk's scores at a time.
    The gradients are exact: each output row depends on its own query row only, so the loss sum(out * dout) is a sum
    over chunks. Causal: a chunk ending before row r sees keys < r only, so it takes k[:r], v[:r], where
    attention_ref's bottom-right mask puts its rows at their own positions. The inputs are widened to fp32 at least
    first, so the chunks' gradients add up in fp32 and round to the inputs' dtype once, as one pass's would."""
    wide = torch.promote_types(q.dtype, torch.float32)
    q, k, v = (t.to(wide) for t in (q, k, v))
    batch, seqlen, heads_q, _ = q.shape
    rows = max(1, CHECK_ELEMENTS // (batch * seqlen * heads_q))

    def chunk(q, k, v):
        return attention_ref(q, k, v, causal=causal, compute_dtype=compute_dtype, upcast_output=upcast_output)[0]
    outs = []
    for start in range(0, seqlen, rows):
        stop = min(start + rows, seqlen)
        keys = slice(0, stop) if causal else slice(None)
        outs.append(checkpoint(chunk, q[:, start:stop], k[:, keys], v[:, keys], use_reentrant=False))
    return torch.cat(outs, dim=1), None


def check_gradients(call: AttnFwdCall, bshd, dout, run: Callable[[], tuple]) -> dict:
    """FlashCore's (dq, dk, dv) from `run` (the timed call): NaN or inf anywhere fails; on batch 0's checked heads
    (checked_heads), each against float64 autograd of the reference with the shared rule (reference.grad_errors:
    4x what the reference loses in the inputs' dtype, plus a floor), the reference taken in chunks."""
    grads = run()
    q_heads, kv_heads = checked_heads(call)
    q, k, v = (t.detach()[:1] for t in bshd)
    picked = [g[:1, :, heads] for g, heads in zip(grads, (q_heads, kv_heads, kv_heads))]
    errors = grad_errors(picked, q[:, :, q_heads], k[:, :, kv_heads], v[:, :, kv_heads], dout[:1, :, q_heads],
                         reference=chunked_reference, causal=call.causal)
    return verdict((err if torch.isfinite(grad).all() else math.inf, tol)
                   for grad, (_, err, tol) in zip(grads, errors))


# ---------------------------------------------------------------------------------------------- suites

def _comma_ints(text: str, option: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        raise ValueError(f"{option}: a comma list of integers, got {text}") from None
    if any(x < 1 for x in values):
        raise ValueError(f"{option}: positive integers, got {text}")
    return values


class _BackwardSuite(Suite):
    """Both suites: attn_fwd's prefill cases as backward calls, every impl's gradients timed, peak memory too."""
    labels = LABELS
    variants = ("default",)
    memory = True
    ratios = {"best": "FC/best", "flash": "FC/SDPA-flash", "flex": "FC/Flex", "cudnn": "FC/cuDNN",
              "default": "tuned/default"}
    alone = True                # the timed call: the backward alone, or forward + backward

    def work(self, fwd: AttnFwdCall, bwd: AttnBwdCall) -> float:
        """A case's work in FLOPs."""
        raise NotImplementedError

    def cases(self, args) -> list[Case]:
        chosen = {key: getattr(args, f"bwd_{key}") or (QUICK if args.bwd_quick else DEFAULTS)[key] for key in QUICK}
        dtypes = chosen["dtypes"].split(",")
        if any(d not in DTYPES for d in dtypes):
            raise ValueError(f"--bwd-dtypes: each one of {', '.join(DTYPES)}, got {chosen['dtypes']}")
        head_dims = _comma_ints(chosen["head_dims"], "--bwd-head-dims")
        seqlens = _comma_ints(chosen["seqlens"], "--bwd-seqlens")
        if any(HIDDEN % d for d in head_dims) or any(TOKENS % s for s in seqlens):
            raise ValueError(f"--bwd-head-dims must divide {HIDDEN} and --bwd-seqlens {TOKENS}")
        causal_modes = {"both": (False, True), "true": (True,), "false": (False,)}[args.bwd_causal]
        cases = []
        for fwd in fwd_bench.build_matrix(dtypes, head_dims, seqlens, causal_modes, args.bwd_gqa):
            bwd = AttnBwdCall(**dataclasses.asdict(fwd))
            cases.append(dataclasses.replace(fwd_bench.case_of(bwd), work=self.work(fwd, bwd)))
        return cases

    def impls(self, args) -> list[str]:
        peers = [] if args.bwd_peers == "none" else [x for x in args.bwd_peers.split(",") if x]
        unknown = [x for x in peers if x not in PEERS]
        if unknown:
            raise ValueError(f"--bwd-peers: unknown {', '.join(unknown)}; known: {', '.join(PEERS)}")
        if "fa" in peers and fwd_bench.flash_attn_peer()[0] is None:
            print("flash-attn not importable: skipped", flush=True)
            peers.remove("fa")
        return ["flashcore", *(["default"] if args.bwd_default else []), *peers]

    def setup(self, case: Case, impls: list[str]) -> Prepared:
        call = case.call
        bshd, bhsd = fwd_bench.make_inputs(call)
        for t in (*bshd, *bhsd):
            t.requires_grad_()
        dout = torch.randn_like(bshd[0])
        fns = timed_calls(call, bshd, bhsd, dout, impls, self.alone)
        return Prepared(fns, check=lambda: check_gradients(call, bshd, dout, fns["flashcore"]))

    def versions(self) -> dict[str, str]:
        fa, name = fwd_bench.flash_attn_peer()
        return {"flash-attn": name if fa else "not installed"}

    def setup_seconds(self, impls: list[str]) -> float:
        # a guess, not measured: inputs, forwards, the float64 check; flex compiles its forward and backward per case
        return 1.5 + 3.0 * ("flex" in impls) + 1.0 * ("fa" in impls)


_NOTES = (f"B x S = {TOKENS} tokens, H x D = {HIDDEN}; forward FLOPs 4*B*Hq*S*S*D, halved when causal. "
          "FC/best, FC/SDPA-flash, FC/Flex, FC/cuDNN: FlashCore against the fastest peer and those three; "
          "tuned/default: FlashCore with dispatch's configs over FlashCore with the heuristic defaults. "
          "Every impl differentiated by torch.autograd.grad on inputs in its own layout. "
          "check: FlashCore's dq, dk, dv finite everywhere, and on batch 0's first and last KV heads against float64 "
          "autograd of the reference.")


class Backward(_BackwardSuite):
    name = "backward"
    title = "Backward"
    notes = ("Backward alone: each forward run once outside timing, the timed call torch.autograd.grad(out, (q, k, v), "
             "dout, retain_graph=True); TFLOP/s over 2.5x the forward's FLOPs; MiB: the backward's own peak, the "
             "forward's saved tensors already alive. " + _NOTES)

    def add_arguments(self, group) -> None:
        # the options of both suites: the harness has one parser, so `backward` adds them and `fwd-bwd` reads them
        group.add_argument("--bwd-dtypes", help="comma list of bf16, fp16 (default bf16)")
        group.add_argument("--bwd-head-dims", help=f"comma list (default {DEFAULTS['head_dims']})")
        group.add_argument("--bwd-seqlens", help=f"comma list (default {DEFAULTS['seqlens']})")
        group.add_argument("--bwd-causal", choices=("both", "true", "false"), default="both")
        group.add_argument("--bwd-gqa", action=argparse.BooleanOptionalAction, default=True,
                           help="the Hq=32/Hkv=8 cases (D=128)")
        group.add_argument("--bwd-peers", default=",".join(PEERS), help="comma list of " + ", ".join(PEERS) +
                           " (default all; flash-attn only if importable); 'none' times FlashCore alone")
        group.add_argument("--bwd-default", action=argparse.BooleanOptionalAction, default=True,
                           help="also time FlashCore with the heuristic default configs (the tuned/default column)")
        group.add_argument("--bwd-quick", action="store_true",
                           help="smoke subset: bf16, D 128 (and GQA), S 2048 and 8192")

    def work(self, fwd: AttnFwdCall, bwd: AttnBwdCall) -> float:
        return bwd.flops


class ForwardBackward(_BackwardSuite):
    name = "fwd-bwd"
    title = "Forward + backward"
    notes = ("Forward then torch.autograd.grad per call; TFLOP/s over 3.5x the forward's FLOPs; MiB: the peak of "
             "both, saved tensors included. " + _NOTES)
    alone = False

    def work(self, fwd: AttnFwdCall, bwd: AttnBwdCall) -> float:
        return fwd.flops + bwd.flops


SUITES = [Backward(), ForwardBackward()]
