"""Host side of the backward kernels (templates/attn_bwd_{preprocess,dkdv,dq}.py.jinja): spec, default tiles,
static feasibility, launch.

A call whose signature (shapes, strides, dtypes, devices, options, pointer alignment) was seen before is one dict
lookup and three launches of kept compiled kernels (flashcore/launch.py); the first call of a signature builds the
spec, asks dispatch for the config and builds the plans. Inputs are the forward's (already checked by
flash_attn_func) plus its out and lse: nothing here re-checks them.
"""
from __future__ import annotations

import torch
import triton

from ... import dispatch
from ...device import MAX_GRID_YZ, arch, arch_class, smem_limit
from ...dtypes import DTYPE_NAMES, ELEM_BYTES
from ...generator import KernelSpec, load
from ...launch import LaunchPlan
from ...value_errors import REPORTERS, raise_pending
from ..attn_fwd.host import alibi_args, score_args
from ..base import Config, next_pow2
from .call import AttnBwdCall

OP_NAME = "attn_bwd"
KERNELS = ("dkdv", "dq")

# Heuristic defaults, (arch class, head_dim up to) -> {kernel: (BLOCK_M, BLOCK_N, num_warps, num_stages)}. The
# dK/dV program holds a key tile and sweeps thin query tiles, the dQ program the reverse (Triton's fused-attention
# tutorial's shapes). GPU rows are untuned starting points; "cpu" (the interpreter) uses tiles that keep tests fast.
DEFAULT_TILES = {
    ("sm90", 128): {"dkdv": (32, 128, 8, 2), "dq": (128, 32, 8, 2)},
    ("sm90", 256): {"dkdv": (32, 64, 8, 1), "dq": (64, 32, 8, 1)},
    ("sm80", 128): {"dkdv": (32, 128, 8, 2), "dq": (128, 32, 8, 2)},
    ("sm80", 256): {"dkdv": (32, 64, 8, 1), "dq": (64, 32, 8, 1)},
    ("cpu", 256): {"dkdv": (32, 32, 4, 1), "dq": (32, 32, 4, 1)},
}


def smem_bytes(spec: KernelSpec, config: Config, kernel: str) -> int:
    """Upper bound of one kernel's staged tiles: num_stages buffers of the two swept tiles (q and dO, or k and
    v) plus the two kept ones."""
    kept, swept = ((config[f"{kernel}.BLOCK_N"], config[f"{kernel}.BLOCK_M"]) if kernel == "dkdv"
                   else (config[f"{kernel}.BLOCK_M"], config[f"{kernel}.BLOCK_N"]))
    rows = 2 * kept + 2 * swept * max(config[f"{kernel}.num_stages"], 1)
    return rows * next_pow2(spec["head_dim"]) * ELEM_BYTES[spec["dtype"]]


def default_config(spec: KernelSpec) -> Config:
    """The heuristic tile config for `spec`: always valid, never tuned."""
    cls = arch_class(spec["arch"])
    head_dim_cap = 256 if cls == "cpu" or spec["head_dim"] > 128 else 128
    tiles = DEFAULT_TILES[(cls, head_dim_cap)]
    return {f"{kernel}.{name}": value for kernel in KERNELS
            for name, value in zip(("BLOCK_M", "BLOCK_N", "num_warps", "num_stages"), tiles[kernel])}


def is_feasible(spec: KernelSpec, config: Config, bucket: tuple[int, ...] | None = None) -> str | None:
    """None if `config` can run `spec` (on shapes of `bucket`), else why not: tiles within the bucket's sequences
    and, on a GPU, the kernels' shared memory."""
    for kernel in KERNELS:
        block_m, block_n = config[f"{kernel}.BLOCK_M"], config[f"{kernel}.BLOCK_N"]
        if bucket is not None:
            if block_m > max(16, bucket[0]):
                return f"{kernel}.BLOCK_M={block_m} > seqlen_q bucket {bucket[0]}"
            if block_n > max(16, bucket[1]):
                return f"{kernel}.BLOCK_N={block_n} > seqlen_k bucket {bucket[1]}"
        if spec["arch"]:
            limit, smem = smem_limit(spec["arch"]), smem_bytes(spec, config, kernel)
            if smem > limit:
                return f"{kernel}: shared memory {smem // 1024} KB > {limit // 1024} KB"
    return None


def spec_of(call: AttnBwdCall, cc: int) -> KernelSpec:
    """The spec for `call` on compute capability `cc` (0: interpreter). The kernels take the pointer path on every
    arch (tma=False: tensor descriptors are later work)."""
    return KernelSpec.make(OP_NAME, arch=int(cc), dtype=call.dtype, head_dim=int(call.head_dim),
                           causal=bool(call.causal), window=bool(call.window), softcap=bool(call.softcap),
                           alibi=bool(call.alibi), gqa_group=int(call.gqa_group), tma=False)


def call_of(q, k, causal: bool, window: bool, softcap: bool, alibi: bool) -> AttnBwdCall:
    batch, seqlen_q, heads_q, head_dim = q.shape
    return AttnBwdCall(batch, seqlen_q, k.shape[1], heads_q, k.shape[2], head_dim, DTYPE_NAMES[q.dtype],
                       causal, window, softcap, alibi)


# signature of a call -> its (preprocess, dkdv, dq) plans; forgotten when dispatch's configs change
_plans: dict[tuple, tuple[LaunchPlan, LaunchPlan, LaunchPlan]] = {}
MAX_PLANS = 4096
dispatch.on_clear(_plans.clear)


def attention_backward(dout, q, k, v, out, lse, softmax_scale: float, causal: bool, window_left: int,
                       window_right: int, softcap: float, alibi_slopes: torch.Tensor | None = None,
                       dlse: torch.Tensor | None = None, config: Config | None = None):
    """(dq, dk, dv) of flash_attn_func's forward, each in its input's shape and dtype, contiguous.

    dout: (B, Sq, Hq, D), q's dtype (any strides); q, k, v, alibi_slopes and the options: the forward's, checked
    (softmax_scale resolved; window sides -1 when unbounded, causal folded into window_right = 0). out: the
    forward's output (B, Sq, Hq, D); lse: its (B, Hq, Sq) fp32 log-sum-exp. dlse: None, or the (B, Hq, Sq)
    gradient of lse (d lse / d s = P, so it enters as delta - dlse). `config` overrides dispatch.
    """
    pending = REPORTERS.get(q.device)     # a failure an earlier KV-cache or varlen call reported on this device
    if pending is not None and pending.view[0]:
        raise_pending(q.device)
    if dout.stride(-1) != 1:     # the kernels read rows with a unit stride (autograd may hand an expanded grad)
        dout = dout.contiguous()
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    if q.numel() == 0 or k.numel() == 0:     # no query or no key: every gradient is 0
        return dq.zero_(), dk.zero_(), dv.zero_()
    batch, seqlen_q, heads_q, _ = q.shape
    delta = torch.empty((batch, heads_q, seqlen_q), dtype=torch.float32, device=q.device)
    key = tuple((t.shape, t.stride(), t.dtype, t.device, t.data_ptr() % 16) for t in (dout, q, k, v, out, lse)) + (
        softmax_scale, causal, window_left, window_right, softcap,
        None if alibi_slopes is None else (alibi_slopes.shape, alibi_slopes.stride(), alibi_slopes.data_ptr() % 16),
        None if config is None else tuple(config.items()))
    plans = _plans.get(key)
    tensors = (q, k, v, dout, out, lse, delta, dq, dk, dv) + (() if alibi_slopes is None else (alibi_slopes,))
    if plans is None:
        if len(_plans) >= MAX_PLANS:
            _plans.clear()
        _plans[key] = _plan(tensors, softmax_scale, causal, window_left, window_right, softcap, dlse, config)
        return dq, dk, dv     # (the plans' first launches computed them)
    preprocess, dkdv, dq_plan = plans
    preprocess(out, dout, delta)
    if dlse is not None:
        delta.sub_(dlse)
    dkdv(*_args(dkdv, tensors))
    dq_plan(*_args(dq_plan, tensors))
    return dq, dk, dv


_NAMES = ("Q", "K", "V", "DOut", "Out", "Lse", "Delta", "DQ", "DK", "DV", "Alibi")


def _args(plan: LaunchPlan, tensors) -> list:
    """The call's tensors in the order of `plan`'s dynamic arguments."""
    named = dict(zip(_NAMES, tensors))
    return [named[name] for name in plan.dynamic]


def _plan(tensors, softmax_scale, causal, window_left, window_right, softcap, dlse, config):
    """The three plans of a signature, each launched once (in order: delta, then dK/dV and dQ, which read it)."""
    q, k, v, dout, out, lse, delta, dq, dk, dv = tensors[:10]
    alibi_slopes = tensors[10] if len(tensors) > 10 else None
    batch, seqlen_q, heads_q, _ = q.shape
    seqlen_k, heads_kv = k.shape[1], k.shape[2]
    if batch > MAX_GRID_YZ or heads_q > MAX_GRID_YZ:
        raise ValueError(f"q: batch ({batch}) and heads ({heads_q}) must each be at most {MAX_GRID_YZ} (CUDA grid "
                         "limit); split the batch")
    has_window = window_left >= 0 or (window_right >= 0 and not causal)
    call = call_of(q, k, causal, has_window, softcap > 0, alibi_slopes is not None)
    spec = spec_of(call, arch(q.device.index or 0) if q.is_cuda else 0)
    if config is None:
        from . import OP
        config = dispatch.config_for(OP, spec, OP.bucket_of(call))
    tile = {kernel: dict(BLOCK_M=config[f"{kernel}.BLOCK_M"], BLOCK_N=config[f"{kernel}.BLOCK_N"],
                         num_warps=config[f"{kernel}.num_warps"], num_stages=config[f"{kernel}.num_stages"])
            for kernel in KERNELS}
    preprocess = LaunchPlan(
        load(spec, "attn_bwd_preprocess").attn_bwd_preprocess,
        grid=(triton.cdiv(seqlen_q, tile["dq"]["BLOCK_M"]), heads_q, batch), dynamic=("Out", "DOut", "Delta"),
        kwargs=dict(Out=out, DOut=dout, Delta=delta,
                    stride_ob=out.stride(0), stride_os=out.stride(1), stride_oh=out.stride(2),
                    stride_dob=dout.stride(0), stride_dos=dout.stride(1), stride_doh=dout.stride(2),
                    num_heads_q=heads_q, seqlen_q=seqlen_q, BLOCK_M=tile["dq"]["BLOCK_M"],
                    num_warps=tile["dq"]["num_warps"]))
    if dlse is not None:
        delta.sub_(dlse)
    common = dict(
        Q=q, K=k, V=v, DOut=dout, Lse=lse, Delta=delta,
        stride_qb=q.stride(0), stride_qs=q.stride(1), stride_qh=q.stride(2),
        stride_kb=k.stride(0), stride_ks=k.stride(1), stride_kh=k.stride(2),
        stride_vb=v.stride(0), stride_vs=v.stride(1), stride_vh=v.stride(2),
        stride_dob=dout.stride(0), stride_dos=dout.stride(1), stride_doh=dout.stride(2),
        num_heads_q=heads_q, seqlen_q=seqlen_q, seqlen_k=seqlen_k,
        softmax_scale=softmax_scale,
        **score_args(softmax_scale, softcap, window_left, window_right, max(seqlen_q, seqlen_k)))
    dynamic = ("Q", "K", "V", "DOut", "Lse", "Delta")
    if alibi_slopes is not None:
        common.update(alibi_args(alibi_slopes))
        dynamic += ("Alibi",)
    dkdv = LaunchPlan(
        load(spec, "attn_bwd_dkdv").attn_bwd_dkdv,
        grid=(triton.cdiv(seqlen_k, tile["dkdv"]["BLOCK_N"]), heads_kv, batch), dynamic=dynamic + ("DK", "DV"),
        kwargs=dict(common, DK=dk, DV=dv,
                    stride_dkb=dk.stride(0), stride_dks=dk.stride(1), stride_dkh=dk.stride(2),
                    stride_dvb=dv.stride(0), stride_dvs=dv.stride(1), stride_dvh=dv.stride(2), **tile["dkdv"]))
    dq_plan = LaunchPlan(
        load(spec, "attn_bwd_dq").attn_bwd_dq,
        grid=(triton.cdiv(seqlen_q, tile["dq"]["BLOCK_M"]), heads_q, batch), dynamic=dynamic + ("DQ",),
        kwargs=dict(common, DQ=dq, stride_dqb=dq.stride(0), stride_dqs=dq.stride(1), stride_dqh=dq.stride(2),
                    **tile["dq"]))
    return preprocess, dkdv, dq_plan
