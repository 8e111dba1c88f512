"""Host side of templates/attn_fwd.py.jinja: spec, default tiles, static feasibility, launch.

The eager hot path: a call whose signature (shapes, strides, dtypes, devices, options, pointer alignment) was
seen before is one dict lookup and one launch of the kept compiled kernel (flashcore/launch.py). The first call of
a signature runs the caller's tensor checks, builds the spec, asks dispatch for the config, loads the kernel and
launches through Triton.
"""
from __future__ import annotations

from typing import Callable

import torch
import triton

from ... import dispatch, profiler
from ...counts import nbytes, visible_keys
from ...device import MAX_GRID_YZ, arch, arch_class, interpreter_mode, regs_limit, smem_limit
from ...dtypes import DTYPE_NAMES, ELEM_BYTES
from ...generator import KernelSpec, load
from ...launch import KeptPlans, LaunchPlan, descriptor
from ...value_errors import REPORTERS, raise_pending
from ..base import Config, next_pow2
from .call import AttnFwdCall

OP_NAME = "attn_fwd"
LOG2E = 1.4426950408889634

# Heuristic defaults, (arch class, head_dim up to, causal) -> (BLOCK_M, BLOCK_N, num_warps, num_stages).
# Used until the tuner has a record for a spec, and always a candidate in tuning. Arch class: "sm90" for
# Hopper and newer, "sm80" for Ampere/Ada, "cpu" for the interpreter (small tiles keep CPU tests fast).
# sm90 rows: best of a 7-config sweep per head_dim on an H100, bf16, 16k tokens per batch (BENCHMARKS.md).
DEFAULT_TILES = {
    ("sm90", 64, False): (128, 64, 8, 3),
    ("sm90", 64, True): (128, 64, 8, 3),
    ("sm90", 128, False): (128, 128, 8, 3),
    ("sm90", 128, True): (128, 128, 8, 3),
    ("sm90", 256, False): (128, 64, 8, 3),
    ("sm90", 256, True): (128, 64, 8, 3),
    ("sm80", 64, False): (128, 64, 4, 3),
    ("sm80", 64, True): (128, 64, 4, 3),
    ("sm80", 128, False): (128, 64, 8, 3),
    ("sm80", 128, True): (128, 64, 8, 3),
    ("sm80", 256, False): (64, 64, 8, 2),
    ("sm80", 256, True): (64, 64, 8, 2),
    ("cpu", 256, False): (32, 32, 4, 1),
    ("cpu", 256, True): (32, 32, 4, 1),
}


def smem_bytes(spec: KernelSpec, config: Config) -> int:
    """num_stages buffers of the K and V tiles, + the Q tile on the pointer path (with host-built tensor
    descriptors Triton 3.6 on an H100 reports exactly the K/V buffers: 197 KB at 128/128/3, D=128)."""
    rows = 2 * config["BLOCK_N"] * max(config["num_stages"], 1) + (0 if spec["tma"] else config["BLOCK_M"])
    return rows * next_pow2(spec["head_dim"]) * ELEM_BYTES[spec["dtype"]]


def regs_per_thread(spec: KernelSpec, config: Config) -> float:
    """fp32 accumulator (BLOCK_M x BLOCK_D) + fp32 scores and their 16-bit copy (BLOCK_M x BLOCK_N x 1.5)."""
    words = config["BLOCK_M"] * next_pow2(spec["head_dim"]) + 1.5 * config["BLOCK_M"] * config["BLOCK_N"]
    return words / (config["num_warps"] * 32)


def default_config(spec: KernelSpec) -> Config:
    """The heuristic tile config for `spec`: always valid, never tuned. WARP_SPECIALIZE (sm90+) is spelled out
    at the kernel's own default, so the default is one point of the search space."""
    cls = arch_class(spec["arch"])
    head_dim_cap = 256 if cls == "cpu" else next(d for d in (64, 128, 256) if spec["head_dim"] <= d)
    block_m, block_n, num_warps, num_stages = DEFAULT_TILES[(cls, head_dim_cap, spec["causal"])]
    if spec["dtype"] == "fp32" and cls != "cpu":   # twice the bytes per tile: halve the key tile
        block_n //= 2
    config = {"BLOCK_M": block_m, "BLOCK_N": block_n, "num_warps": num_warps, "num_stages": num_stages}
    # the table assumes TMA's shared memory; the pointer path also stages Q: drop pipeline stages to fit
    while cls != "cpu" and config["num_stages"] > 1 and smem_bytes(spec, config) > smem_limit(spec["arch"]):
        config["num_stages"] -= 1
    if spec["arch"] >= 90:
        config["WARP_SPECIALIZE"] = 0
    return config


def is_feasible(spec: KernelSpec, config: Config, bucket: tuple[int, ...] | None = None) -> str | None:
    """None if `config` compiles and runs for `spec` (on shapes of `bucket`), else why not: the limits beyond each
    tunable's declared values (OP.tunables: powers-of-two tiles in [16, 256], 1-16 warps), which Op.check_config
    applies first. Checked before any compile in tuning, and on every record dispatch reads."""
    return tiles_fit(spec, config, None if bucket is None else bucket[:2])


def tiles_fit(spec: KernelSpec, config: Config, lengths: tuple[int, int] | None = None,
              names: tuple[str, str] = ("seqlen_q", "seqlen_k")) -> str | None:
    """is_feasible of a forward-family kernel (this one; attn_varlen's, whose spec says tma=False): tiles within the
    (query, key) lengths of a bucket, named `names`, then the GPU's shared memory and registers."""
    block_m, num_warps = config["BLOCK_M"], config["num_warps"]
    if lengths is not None:
        for tile, length, name in (("BLOCK_M", lengths[0], names[0]), ("BLOCK_N", lengths[1], names[1])):
            if config[tile] > max(16, length):
                return f"{tile}={config[tile]} > {name} bucket {length}"
    cc = spec["arch"]
    if cc == 0:
        return None
    if config.get("WARP_SPECIALIZE") and cc < 90:
        return "WARP_SPECIALIZE needs sm90+"
    limit, smem = smem_limit(cc), smem_bytes(spec, config)
    if smem > limit:
        return f"shared memory {smem // 1024} KB > {limit // 1024} KB"
    regs = regs_per_thread(spec, config)
    if regs > regs_limit(num_warps):   # ptxas: "Insufficient registers" (seen at 256 x 32 x 16 warps, D=256, H100)
        return f"~{regs:.0f} registers per thread > {regs_limit(num_warps)} ({num_warps} warps)"
    if block_m < 8 * num_warps:
        return f"BLOCK_M={block_m} gives under 8 rows per warp with {num_warps} warps"
    if config.get("WARP_SPECIALIZE") and num_warps < 8:
        return "WARP_SPECIALIZE with 4 warps fails Triton 3.6's NVGPUWarpSpecialization pass"
    return None


def spec_of(call: AttnFwdCall, cc: int, aligned: bool = True) -> KernelSpec:
    """The spec for `call` on compute capability `cc` (0: interpreter); `aligned`: inputs fit tensor descriptors
    (16-byte aligned bases and strides), which sm90 then loads through the bulk tensor copy engine (TMA)."""
    tma = cc >= 90 and call.head_dim == next_pow2(call.head_dim) and aligned
    return KernelSpec.make(OP_NAME, arch=int(cc), dtype=call.dtype, head_dim=int(call.head_dim),
                           causal=bool(call.causal), window=bool(call.window), softcap=bool(call.softcap),
                           alibi=bool(call.alibi), gqa_group=int(call.gqa_group), tma=tma)


def build_spec(cc: int, dtype: str = "bf16", head_dim: int = 128, causal: bool = False, window: bool = False,
               softcap: bool = False, alibi: bool = False, gqa_group: int = 1, aligned: bool = True) -> KernelSpec:
    """The spec of a call with these features on compute capability `cc` (tests, tools)."""
    call = AttnFwdCall(1, 1, 1, gqa_group, 1, head_dim, dtype, causal, window, softcap, alibi)
    return spec_of(call, cc, aligned)


def tma_ok(*tensors: torch.Tensor) -> bool:
    """Tensor descriptors need 16-byte aligned bases and positive 16-byte aligned strides (a broadcast
    dimension, stride 0, takes the pointer path)."""
    for t in tensors:
        size = t.element_size()
        if t.data_ptr() % 16 or any(s <= 0 or (s * size) % 16 for s in t.stride()[:-1]):
            return False
    return True


def call_of(q, k, causal: bool, window: bool, softcap: bool, alibi: bool = False) -> AttnFwdCall:
    batch, seqlen_q, heads_q, head_dim = q.shape
    return AttnFwdCall(batch, seqlen_q, k.shape[1], heads_q, k.shape[2], head_dim, DTYPE_NAMES[q.dtype],
                       causal, window, softcap, alibi)


def runtime_spec(call: AttnFwdCall, q, k, v) -> KernelSpec:
    """The spec the runtime builds for `call` on these tensors (their device and alignment decide TMA)."""
    cc = arch(q.device.index or 0) if q.is_cuda else 0
    return spec_of(call, cc, aligned=cc >= 90 and tma_ok(q, k, v))


def make_spec(q, k, v, causal: bool, window: bool, softcap: bool, alibi: bool = False) -> KernelSpec:
    """The spec the runtime builds for these tensors."""
    return runtime_spec(call_of(q, k, causal, window, softcap, alibi), q, k, v)


def score_args(softmax_scale: float, softcap: float, window_left: int, window_right: int, unbounded: int) -> dict:
    """The attention kernels' score arguments (forward, varlen, backward, decode): qk_scale (log2 units, or
    softmax_scale / softcap under a cap), softcap_log2e, and the window sides. A side of -1 reaches every key, and
    so does any side wider than `unbounded` (the longest the positions can be apart): clamped to it, the kernels'
    position arithmetic (row + side + BLOCK) stays far from int32 overflow."""
    return dict(qk_scale=softmax_scale / softcap if softcap > 0 else softmax_scale * LOG2E,
                softcap_log2e=softcap * LOG2E,
                window_left=window_left if 0 <= window_left < unbounded else unbounded,
                window_right=window_right if 0 <= window_right < unbounded else unbounded)


def alibi_args(alibi_slopes) -> dict:
    """The kernels' ALiBi arguments: none without slopes; (Hq,) slopes have a batch stride of 0."""
    if alibi_slopes is None:
        return {}
    return dict(Alibi=alibi_slopes, stride_alibi_b=alibi_slopes.stride(0) if alibi_slopes.dim() == 2 else 0)


def _check_row_offsets(spec: KernelSpec, q, k, v, out) -> None:
    """The kernel adds row * row_stride in int32 to an int64 (batch, head) base: refuse what would overflow."""
    tensors = (("out", out),) if spec["tma"] else (("q", q), ("k", k), ("v", v), ("out", out))
    for name, t in tensors:
        if (t.shape[1] - 1) * t.stride(1) + t.shape[3] > 2**31 - 1:
            raise ValueError(f"{name}: seqlen {t.shape[1]} x row stride {t.stride(1)} exceeds the kernel's 32-bit "
                             "row offsets (2^31 elements per batch and head); split the batch or the sequence")


# signature of a call -> its LaunchPlan; forgotten when dispatch's configs change (dispatch.clear)
_plans = KeptPlans()


def attention_forward(q, k, v, softmax_scale: float | None, causal: bool, window_left: int, window_right: int,
                      softcap: float, return_lse: bool, alibi_slopes: torch.Tensor | None = None,
                      config: Config | None = None, check: Callable | None = None):
    """Checked inputs in, (out, lse) out; lse is None unless `return_lse`.

    softmax_scale: None for 1 / sqrt(head_dim). window_left / window_right are -1 when unbounded; causal must
    already be folded in (window_right = 0). alibi_slopes: None, or fp32 (Hq,) / (B, Hq) with a unit stride on
    heads. `config` overrides dispatch (the tuner and tests use it).
    `check(q, k, v, alibi_slopes)`: the caller's input checks (flash_attn_func's), run on the first call of a
    signature only. They may read only what the signature holds: each tensor's type, shape, strides, dtype and
    device, and TRITON_INTERPRET; so every later call of that signature passes them too. Arguments that are not
    tensors fail in the signature and go to `check`, which names them.
    """
    if profiler.ACTIVE is not None:        # inside flashcore.profile(): timed and described
        return profiler.ACTIVE.measure(attention_forward, locals(), profiled)
    try:
        shape_q, device = q.shape, q.device
        # everything the plan depends on (Triton specializes on shapes, strides, scalars and 16-byte alignment of
        # pointers) and everything `check` reads
        key = (shape_q, k.shape, v.shape, q.stride(), k.stride(), v.stride(), q.dtype, k.dtype, v.dtype,
               device, k.device, v.device, q.data_ptr() % 16, k.data_ptr() % 16, v.data_ptr() % 16,
               type(q), type(k), type(v), softmax_scale, causal, window_left, window_right, softcap, return_lse,
               None if alibi_slopes is None else (type(alibi_slopes), alibi_slopes.shape, alibi_slopes.stride(),
                                                  alibi_slopes.dtype, alibi_slopes.device,
                                                  alibi_slopes.data_ptr() % 16),
               None if config is None else tuple(config.items()), check, interpreter_mode())
    except Exception:      # not tensors (or tensors without strides): the caller's checks say what was expected
        if check is not None:
            check(q, k, v, alibi_slopes)
        raise
    pending = REPORTERS.get(device)      # a failure an earlier KV-cache call reported on this device
    if pending is not None and pending.view[0]:
        raise_pending(device)
    plan = _plans.get(key)
    if plan is None:
        return _first_call(key, q, k, v, softmax_scale, causal, window_left, window_right, softcap, return_lse,
                           alibi_slopes, config, check)
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if return_lse:
        batch, seqlen_q, heads_q, _ = shape_q
        lse = torch.empty((batch, heads_q, seqlen_q), dtype=torch.float32, device=device)
        plan(q, k, v, out, lse, alibi_slopes)
        return out, lse
    plan(q, k, v, out, out, alibi_slopes)   # (no Lse to store: Out stands in; no Alibi argument: zip drops it)
    return out, None


def profiled(q, k, v, softmax_scale, causal, window_left, window_right, softcap, return_lse, alibi_slopes=None,
             config=None, check=None) -> profiler.Described:
    """What flashcore.profile() records of an attention_forward call (its arguments)."""
    batch, seqlen_q, heads_q, head_dim = q.shape
    has_window = window_left >= 0 or (window_right >= 0 and not causal)
    call = call_of(q, k, causal, has_window, softcap > 0, alibi_slopes is not None)
    spec = runtime_spec(call, q, k, v) if q.numel() and k.shape[1] else None
    flops = 4.0 * heads_q * head_dim * batch * visible_keys(seqlen_q, k.shape[1], causal, (window_left, window_right))
    moved = nbytes(q, k, v, q) + (4 * batch * heads_q * seqlen_q if return_lse else 0)
    from . import OP
    return profiler.Described(OP_NAME, call.describe(), spec, OP.bucket_of(call), config, lambda: (flops, moved))


def _first_call(key, q, k, v, softmax_scale, causal, window_left, window_right, softcap, return_lse, alibi_slopes,
                config, check):
    """A signature's first call: checks, outputs, and (unless there is nothing to compute) the plan's first
    launch."""
    if check is not None:
        check(q, k, v, alibi_slopes)
    batch, seqlen_q, heads_q, head_dim = q.shape
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty((batch, heads_q, seqlen_q), dtype=torch.float32, device=q.device) if return_lse else None
    if out.numel() == 0:
        return out, lse
    if k.shape[1] == 0:   # no key to attend to (and tensor descriptors reject empty dimensions)
        out.zero_()
        if lse is not None:
            lse.fill_(float("-inf"))
        return out, lse
    if softmax_scale is None:
        softmax_scale = head_dim ** -0.5
    _plans.put(key, _plan(q, k, v, out, lse, softmax_scale, causal, window_left, window_right, softcap,
                          return_lse, alibi_slopes, config))   # launches once
    return out, lse


def _plan(q, k, v, out, lse, softmax_scale, causal, window_left, window_right, softcap, return_lse,
          alibi_slopes, config) -> LaunchPlan:
    batch, seqlen_q, heads_q, _ = q.shape
    if batch > MAX_GRID_YZ or heads_q > MAX_GRID_YZ:
        raise ValueError(f"q: batch ({batch}) and heads ({heads_q}) must each be at most {MAX_GRID_YZ} (CUDA grid "
                         "limit); split the batch")
    has_window = window_left >= 0 or (window_right >= 0 and not causal)
    alibi = alibi_slopes is not None
    call = call_of(q, k, causal, has_window, softcap > 0, alibi)
    spec = runtime_spec(call, q, k, v)
    _check_row_offsets(spec, q, k, v, out)
    args = (q, k, v, out, lse, softmax_scale, window_left, window_right, softcap, return_lse, alibi_slopes)
    if config is not None:
        return _launch_plan(spec, config, *args)
    from . import OP
    return dispatch.first_launch(OP, spec, OP.bucket_of(call), lambda config: _launch_plan(spec, config, *args))


def _launch_plan(spec, config, q, k, v, out, lse, softmax_scale, window_left, window_right, softcap, return_lse,
                 alibi_slopes) -> LaunchPlan:
    batch, seqlen_q, heads_q, _ = q.shape
    seqlen_k = k.shape[1]
    kernel = load(spec).attn_fwd
    if spec["tma"]:
        d = q.shape[-1]
        q_arg = descriptor(q, [1, config["BLOCK_M"], 1, d])
        k_arg, v_arg = descriptor(k, [1, config["BLOCK_N"], 1, d]), descriptor(v, [1, config["BLOCK_N"], 1, d])
    else:
        q_arg, k_arg, v_arg = q, k, v
    alibi = alibi_args(alibi_slopes)
    return LaunchPlan(
        kernel, grid=(triton.cdiv(seqlen_q, config["BLOCK_M"]), heads_q, batch),
        dynamic=("Q", "K", "V", "Out", "Lse") + (("Alibi",) if alibi else ()),
        kwargs=dict(**alibi,
            Q=q_arg, K=k_arg, V=v_arg, Out=out, Lse=out if lse is None else lse,
            stride_qb=q.stride(0), stride_qs=q.stride(1), stride_qh=q.stride(2),
            stride_kb=k.stride(0), stride_ks=k.stride(1), stride_kh=k.stride(2),
            stride_vb=v.stride(0), stride_vs=v.stride(1), stride_vh=v.stride(2),
            stride_ob=out.stride(0), stride_os=out.stride(1), stride_oh=out.stride(2),
            num_heads_q=heads_q, seqlen_q=seqlen_q, seqlen_k=seqlen_k,
            **score_args(softmax_scale, softcap, window_left, window_right, max(seqlen_q, seqlen_k)),
            STORE_LSE=return_lse,
            **config,
        ))
