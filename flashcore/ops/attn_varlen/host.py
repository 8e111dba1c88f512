"""Host side of templates/attn_varlen.py.jinja: spec, default tiles, static feasibility, value checks, launch.

The eager hot path is the dense forward's (ops/attn_fwd/host.py): a call whose signature (shapes, strides, dtypes,
devices, max_seqlen, options, pointer alignment) was seen before is one dict lookup, a read of the device's failure
report, the output allocation and one launch of the kept kernel. Values (cu_seqlens, block-table entries) are
checked as value_errors.value_check_mode() says: on the host at the call for CPU tensors and in strict mode, else
by the kernel without a sync, reported to the next call.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import triton

from ... import dispatch, profiler
from ...counts import nbytes, useful_flops
from ...device import arch, arch_class, interpreter_mode, smem_limit
from ...dtypes import DTYPE_NAMES
from ...generator import KernelSpec, load
from ...launch import KeptPlans, LaunchPlan, descriptor
from ...value_errors import (Reporter, checks_at_the_call, describe_failure, raise_pending, reporter,
                             value_check_mode)
from ..attn_fwd.host import alibi_args, score_args, smem_bytes, tiles_fit, tma_ok
from ..base import Config, next_pow2
from .call import AttnVarlenCall

OP_NAME = "attn_varlen"
MAX_SEQ_CHUNK = 256        # sequences a program reads at once while finding its tile (more: a loop)

# Heuristic defaults, (arch class, head_dim up to) -> (BLOCK_M, BLOCK_N, num_warps, num_stages): the dense
# forward's pointer-path tiles; a paged TMA spec caps BLOCK_N at the page (a key tile lies in one block).
TMA_PAGE = 64              # paged K/V by bulk tensor copy for blocks of a multiple of this many keys
DEFAULT_TILES = {
    ("sm90", 64): (128, 64, 8, 3), ("sm90", 128): (128, 64, 8, 3), ("sm90", 256): (64, 64, 8, 2),
    ("sm80", 64): (128, 64, 4, 3), ("sm80", 128): (128, 64, 8, 3), ("sm80", 256): (64, 64, 8, 2),
    ("cpu", 256): (32, 32, 4, 1),
}


def seq_chunk(batch: int) -> int:
    """SEQ_CHUNK of the kernels that find their tile over cu_seqlens (_varlen_tile): sequences read per step."""
    return min(MAX_SEQ_CHUNK, max(16, next_pow2(batch)))


def default_config(spec: KernelSpec) -> Config:
    cls = arch_class(spec["arch"])
    head_dim_cap = 256 if cls == "cpu" else next(d for d in (64, 128, 256) if spec["head_dim"] <= d)
    block_m, block_n, num_warps, num_stages = DEFAULT_TILES[(cls, head_dim_cap)]
    if spec["dtype"] == "fp32" and cls != "cpu":   # twice the bytes per tile: halve the key tile
        block_n //= 2
    if spec["tma"] and spec["page_size"]:
        block_n = min(block_n, spec["page_size"])
    config = {"BLOCK_M": block_m, "BLOCK_N": block_n, "num_warps": num_warps, "num_stages": num_stages}
    while cls != "cpu" and config["num_stages"] > 1 and smem_bytes(spec, config) > smem_limit(spec["arch"]):
        config["num_stages"] -= 1
    return config


def is_feasible(spec: KernelSpec, config: Config, bucket: tuple[int, ...] | None = None) -> str | None:
    """None if `config` runs `spec` (on shapes of `bucket`: total_q * heads_q, max_seqlen_q, max_seqlen_k), else
    why not: the dense forward's limits (tiles_fit), the lengths being the bucket's max_seqlen; a paged TMA spec's
    key tile within one cache block."""
    if spec["tma"] and spec["page_size"] % config["BLOCK_N"]:
        return f"BLOCK_N={config['BLOCK_N']} does not divide the cache's blocks of {spec['page_size']} keys (TMA)"
    return tiles_fit(spec, config, None if bucket is None else bucket[1:], ("max_seqlen_q", "max_seqlen_k"))


def spec_of(call: AttnVarlenCall, cc: int, aligned: bool = True) -> KernelSpec:
    """The spec for `call` on compute capability `cc` (0: interpreter); `aligned`: q, k, v fit tensor descriptors
    (16-byte aligned bases and strides, no empty dimension), which sm90 then loads by bulk tensor copy: packed K/V,
    or paged with blocks of a multiple of TMA_PAGE keys (smaller blocks gather per key through pointers)."""
    tma = cc >= 90 and aligned and call.head_dim == next_pow2(call.head_dim) and call.page_size % TMA_PAGE == 0
    return KernelSpec.make(OP_NAME, arch=int(cc), dtype=call.dtype, head_dim=int(call.head_dim),
                           causal=bool(call.causal), window=bool(call.window), softcap=bool(call.softcap),
                           alibi=bool(call.alibi), gqa_group=int(call.gqa_group), page_size=int(call.page_size),
                           tma=bool(tma))


def make_spec(q, k, v, call: AttnVarlenCall) -> KernelSpec:
    """The spec the runtime builds for `call` on these tensors (their device and alignment decide TMA)."""
    cc = arch(q.device.index or 0) if q.is_cuda else 0
    return spec_of(call, cc, aligned=cc >= 90 and q.shape[0] > 0 and k.shape[0] > 0 and tma_ok(q, k, v))


def call_of(q, k, cu_seqlens_q, max_seqlen_q: int, max_seqlen_k: int, block_table, causal: bool, window: bool,
            softcap: bool, alibi: bool) -> AttnVarlenCall:
    total_q, heads_q, head_dim = q.shape
    return AttnVarlenCall(cu_seqlens_q.shape[0] - 1, total_q, max_seqlen_q, max_seqlen_k, heads_q, k.shape[-2],
                          head_dim, DTYPE_NAMES[q.dtype], k.shape[1] if block_table is not None else 0, causal,
                          window, softcap, alibi)


# -- value checks on the host (CPU tensors, strict mode): the kernel's rules (value_checks.jinja), in Python --

def first_failure(cu_q: list[int], cu_k: list[int], table: list[list[int]] | None, page_size: int, total_q: int,
                  total_k: int, max_seqlen_q: int, max_seqlen_k: int, capacity: int) -> tuple[int, ...] | None:
    """(code, b, value, extra) of the first failing sequence, else None; the codes of _varlen_codes and 5."""
    batch = len(cu_q) - 1
    for b in range(batch):
        q_lo, q_hi, k_lo, k_hi = cu_q[b], cu_q[b + 1], cu_k[b], cu_k[b + 1]
        last = b == batch - 1
        if q_hi < q_lo or (b == 0 and q_lo != 0) or (last and q_hi != total_q):
            return 7, b, q_lo, q_hi
        if k_hi < k_lo or (b == 0 and k_lo != 0) or (not page_size and last and k_hi != total_k):
            return 8, b, k_lo, k_hi
        if q_hi - q_lo > max_seqlen_q:
            return 9, b, q_hi - q_lo, 0
        if k_hi - k_lo > max_seqlen_k:
            return 10, b, k_hi - k_lo, 0
        if k_hi - k_lo > capacity:
            return 11, b, k_hi - k_lo, 0
    for b in range(batch if table is not None else 0):
        for column in range(triton.cdiv(cu_k[b + 1] - cu_k[b], page_size)):
            if not 0 <= table[b][column] < total_k:
                return 5, b, column, table[b][column]
    return None


def check_values(plan: "VarlenPlan", cu_q: torch.Tensor, cu_k: torch.Tensor, block_table) -> None:
    """The call's values, read on the host (one device sync for CUDA tensors): the first failure raises."""
    values = torch.cat([cu_q, cu_k] + ([block_table.flatten()] if block_table is not None else [])).tolist()
    batch = cu_q.shape[0] - 1
    table = None
    if block_table is not None:
        width = block_table.shape[1]
        table = [values[2 * batch + 2 + b * width: 2 * batch + 2 + (b + 1) * width] for b in range(batch)]
    capacity, total_q, total_k, max_q, max_k = plan.scalars
    found = first_failure(values[:batch + 1], values[batch + 1: 2 * batch + 2], table, plan.page_size, total_q,
                          total_k, max_q, max_k, capacity)
    if found is not None:
        code, b, value, extra = found
        raise ValueError(describe_failure(code, b, value, extra, *plan.scalars))


@dataclass(eq=False)            # (hashed by identity: value_errors keeps them in a WeakSet)
class VarlenPlan:
    """The kept launch of one call signature and what a call allocates for it."""
    launch: LaunchPlan | None    # None: nothing to launch (no query row)
    reporter: Reporter | None    # the device's failure report; None: checks off
    strict: bool                 # check values on the host before launching (CPU tensors; strict mode)
    scalars: tuple               # (capacity, total_q, total_k, max_seqlen_q, max_seqlen_k): what a failure reports
    page_size: int
    lse_shape: tuple | None      # (Hq, total_q) with return_lse
    batch: int
    function = "flash_attn_varlen_func"   # (for a deferred failure's message: value_errors.py)
    description: str = ""
    last_call: int = 0

    def reports_as(self, b: int, scalars: tuple) -> bool:
        return b < self.batch and scalars == self.scalars

    def run(self, q, k, v, cu_q, cu_k, block_table, alibi):
        reporter = self.reporter
        if reporter is not None:
            if reporter.view[0]:
                raise_pending(q.device)
            reporter.count(self)
        if self.strict:
            check_values(self, cu_q, cu_k, block_table)
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
        lse = None if self.lse_shape is None else torch.empty(self.lse_shape, dtype=torch.float32, device=q.device)
        if self.launch is not None:
            self.launch(q, k, v, out, out if lse is None else lse, cu_q, cu_k,
                        *(() if block_table is None else (block_table,)), *(() if alibi is None else (alibi,)))
        elif lse is not None:
            lse.fill_(float("-inf"))
        return out, lse


# signature of a call -> its VarlenPlan; forgotten when dispatch's configs change (dispatch.clear)
_plans = KeptPlans()


def _meta(t):
    return None if t is None else (type(t), t.shape, t.stride(), t.dtype, t.device, t.data_ptr() % 16)


def varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int,
                     softmax_scale: float | None, causal: bool, window_left: int, window_right: int, softcap: float,
                     return_lse: bool, alibi_slopes=None, block_table=None, config: Config | None = None,
                     check: Callable | None = None):
    """Checked inputs in, (out, lse) out; lse is None unless `return_lse`.

    window_left / window_right: -1 when unbounded, causal folded in (window_right = 0). `config` overrides dispatch
    (the tuner and tests use it). `check(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
    alibi_slopes, block_table)`: the caller's tensor checks, run on a signature's first call only (they may read
    what the signature holds: types, shapes, strides, dtypes, devices, max_seqlen). The key holds `check` itself: pass
    a long-lived function, not a closure made per call (which would make every call a new signature)."""
    if profiler.ACTIVE is not None:        # inside flashcore.profile(): timed and described
        return profiler.ACTIVE.measure(varlen_attention, locals(), profiled)
    try:
        key = (_meta(q), _meta(k), _meta(v), _meta(cu_seqlens_q), _meta(cu_seqlens_k), _meta(block_table),
               _meta(alibi_slopes), max_seqlen_q, max_seqlen_k, softmax_scale, causal, window_left, window_right,
               softcap, return_lse, None if config is None else tuple(config.items()), check, interpreter_mode())
        plan = _plans.get(key)
    except Exception:          # not tensors, or unhashable options: the caller's checks say what was expected
        if check is not None:
            check(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, alibi_slopes, block_table)
        raise
    if plan is None:
        if check is not None:
            check(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, alibi_slopes, block_table)
        plan, out, lse = _new_plan(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
                                   causal, window_left, window_right, softcap, return_lse, alibi_slopes, block_table,
                                   config)
        if not (q.is_cuda and torch.cuda.is_current_stream_capturing()):   # (a captured plan's report is the
            _plans.put(key, plan)                                              # graph's to replay)
        return out, lse
    return plan.run(q, k, v, cu_seqlens_q, cu_seqlens_k, block_table, alibi_slopes)


def profiled(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal, window_left,
             window_right, softcap, return_lse, alibi_slopes=None, block_table=None, config=None,
             check=None) -> profiler.Described:
    """What flashcore.profile() records of a varlen_attention call (its arguments). The lengths are copied on the
    device now (no sync) and read when the profile closes."""
    total_q, heads_q, head_dim = q.shape
    has_window = window_left >= 0 or (window_right >= 0 and not causal)
    call = call_of(q, k, cu_seqlens_q, max_seqlen_q, max_seqlen_k, block_table, causal, has_window, softcap > 0,
                   alibi_slopes is not None)
    spec = make_spec(q, k, v, call) if total_q else None
    cu_q, cu_k = cu_seqlens_q.clone(), cu_seqlens_k.clone()
    q_and_out = 2 * nbytes(q) + (4 * heads_q * total_q if return_lse else 0)
    token_bytes = 2 * k.shape[-2] * head_dim * k.element_size()      # K and V of one key (packed or in the cache)

    def counts():
        seqlens_q, seqlens_k = (torch.diff(cu).tolist() for cu in (cu_q, cu_k))
        flops = useful_flops(seqlens_q, seqlens_k, heads_q, head_dim, causal, (window_left, window_right))
        return flops, q_and_out + sum(seqlens_k) * token_bytes
    from . import OP
    return profiler.Described(OP_NAME, call.describe(), spec, OP.bucket_of(call), config, counts)


def describe_call(q, k, cu_seqlens_q, max_seqlen_q, max_seqlen_k, block_table, causal, window_left,
                  window_right) -> str:
    """The shapes of a varlen call, as a deferred failure's message names it."""
    parts = [f"q {tuple(q.shape)} {DTYPE_NAMES[q.dtype]}", f"k {tuple(k.shape)}",
             f"cu_seqlens_q ({cu_seqlens_q.shape[0]},)", f"max_seqlen_q={max_seqlen_q}", f"max_seqlen_k={max_seqlen_k}"]
    if block_table is not None:
        parts.append(f"block_table {tuple(block_table.shape)}")
    parts += ["causal"] * causal + [f"window_size=({window_left}, {window_right})"] * (window_left >= 0)
    return ", ".join(parts)


def _new_plan(q, k, v, cu_q, cu_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal, window_left, window_right,
              softcap, return_lse, alibi_slopes, block_table, config) -> tuple[VarlenPlan, torch.Tensor, torch.Tensor]:
    """A signature's first call: its plan, built and launched once, and the call's (out, lse)."""
    total_q, heads_q, head_dim = q.shape
    batch = cu_q.shape[0] - 1
    paged = block_table is not None
    page_size = k.shape[1] if paged else 0
    capacity = block_table.shape[1] * page_size if paged else max_seqlen_k
    total_k = k.shape[0]
    mode = value_check_mode()
    device = q.device
    plan = VarlenPlan(None, None if mode == "off" else reporter(device), checks_at_the_call(mode, device),
                      (capacity, total_q, total_k, max_seqlen_q, max_seqlen_k), page_size,
                      (heads_q, total_q) if return_lse else None, batch)
    if plan.reporter is not None:
        raise_pending(device)
        plan.reporter.count(plan)
        plan.description = describe_call(q, k, cu_q, max_seqlen_q, max_seqlen_k, block_table, causal, window_left,
                                         window_right)
        plan.reporter.signatures.add(plan)
    if plan.strict:
        check_values(plan, cu_q, cu_k, block_table)
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty((heads_q, total_q), dtype=torch.float32, device=device) if return_lse else None
    if total_q == 0:
        return plan, out, lse
    if softmax_scale is None:
        softmax_scale = head_dim ** -0.5
    has_window = window_left >= 0 or (window_right >= 0 and not causal)
    call = call_of(q, k, cu_q, max_seqlen_q, max_seqlen_k, block_table, causal, has_window, softcap > 0,
                   alibi_slopes is not None)
    spec = make_spec(q, k, v, call)
    args = (plan, q, k, v, out, lse, cu_q, cu_k, block_table, alibi_slopes, max_seqlen_q, max_seqlen_k, capacity,
            softmax_scale, window_left, window_right, softcap)
    if config is not None:
        plan.launch = _launch_plan(spec, config, *args)
    else:
        from . import OP
        plan.launch = dispatch.first_launch(OP, spec, OP.bucket_of(call),
                                            lambda config: _launch_plan(spec, config, *args))
    return plan, out, lse


def _launch_plan(spec, config, plan, q, k, v, out, lse, cu_q, cu_k, block_table, alibi_slopes, max_seqlen_q,
                 max_seqlen_k, capacity, softmax_scale, window_left, window_right, softcap) -> LaunchPlan:
    total_q, heads_q, _ = q.shape
    batch = plan.batch
    paged = block_table is not None
    alibi = alibi_args(alibi_slopes)
    q_arg, k_arg, v_arg = q, k, v
    if spec["tma"]:
        q_arg = descriptor(q, [config["BLOCK_M"], 1, q.shape[-1]])
        kv_block = [1, config["BLOCK_N"], 1, k.shape[-1]] if paged else [config["BLOCK_N"], 1, k.shape[-1]]
        k_arg, v_arg = descriptor(k, kv_block), descriptor(v, kv_block)
    dynamic = ("Q", "K", "V", "Out", "Lse", "CuSeqlensQ", "CuSeqlensK") + (("BlockTable",) if paged else ()) \
        + (("Alibi",) if alibi else ())
    return LaunchPlan(
        load(spec).attn_varlen, grid=(triton.cdiv(total_q, config["BLOCK_M"]) + batch, heads_q),
        dynamic=dynamic,
        kwargs=dict(**alibi,
            Q=q_arg, K=k_arg, V=v_arg, Out=out, Lse=out if lse is None else lse, CuSeqlensQ=cu_q, CuSeqlensK=cu_k,
            BlockTable=block_table, Report=reporter(q.device).tensor,
            stride_qs=q.stride(0), stride_qh=q.stride(1),
            stride_ks=k.stride(-3), stride_kh=k.stride(-2), stride_kp=k.stride(0) if paged else 0,
            stride_vs=v.stride(-3), stride_vh=v.stride(-2), stride_vp=v.stride(0) if paged else 0,
            stride_os=out.stride(0), stride_oh=out.stride(1), stride_bt=block_table.stride(0) if paged else 0,
            batch=batch, total_q=total_q, total_k=k.shape[0], max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
            capacity=capacity,
            **score_args(softmax_scale, softcap, window_left, window_right, max(max_seqlen_q, max_seqlen_k, 1)),
            STORE_LSE=lse is not None, CHECK=plan.reporter is not None,
            SEQ_CHUNK=seq_chunk(batch),
            **config,
        ))

