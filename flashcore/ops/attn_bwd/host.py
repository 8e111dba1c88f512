"""Host side of the backward kernels (templates/attn_bwd_{preprocess,dkdv,dq}.py.jinja): spec, default tiles,
static feasibility, launch. Two entry points: attention_backward (flash_attn_func's (B, S, H, D) tensors) and
varlen_attention_backward (flash_attn_varlen_func's packed sequences, K/V packed too); they differ only in their
grids and layout arguments (_dense_plan, _varlen_plan).

Two schemes (the entry points' `dq_atomic`): the dQ kernel, preprocess -> dK/dV -> dQ (each gradient written once
per tile: bit-identical run to run), and atomic dQ (spec feature dq_atomic): preprocess (which also zeroes an fp32
dq_acc in q's shape, one torch.empty per call) -> dK/dV (which adds dS @ K into dq_acc with fp32 atomics) ->
attn_bwd_dq_convert (dq = softmax_scale * dq_acc in q's dtype). Which one flash-attn's `deterministic` flag runs:
dq_atomic_for.

A call whose signature (shapes, strides, dtypes, devices, options, pointer alignment) was seen before is one dict
lookup and three launches of kept compiled kernels (flashcore/launch.py's Steps, which pick their tensors from the
call's by slot); the first call of a signature builds the spec, asks dispatch for the config and builds the plans.
Inputs are the forward's (already checked by flash_attn_func / flash_attn_varlen_func) plus its out and lse: nothing
here re-checks them.
"""
from __future__ import annotations

import torch
import triton

from ... import dispatch, profiler
from ...counts import BACKWARD_FLOPS, nbytes, useful_flops
from ...device import MAX_GRID_YZ, arch, arch_class, smem_limit
from ...dtypes import DTYPE_NAMES, ELEM_BYTES
from ...generator import KernelSpec, load
from ...launch import KeptPlans, Step, launched_step, signature
from ...value_errors import REPORTERS, raise_pending
from ..attn_fwd.host import alibi_args, score_args, tma_ok
from ..attn_varlen.host import seq_chunk
from ..base import Config, next_pow2
from .call import AttnBwdCall

OP_NAME = "attn_bwd"
KERNELS = ("dkdv", "dq")

# Heuristic defaults, (arch class, head_dim up to) -> {kernel: (BLOCK_M, BLOCK_N, num_warps, num_stages)}. The
# dK/dV program holds a key tile and sweeps thin query tiles, the dQ program the reverse (Triton's fused-attention
# tutorial's shapes), except on sm90 up to D 128: square 64 x 64 tiles at 4 warps, what every bucket of the H100's
# first backward tune chose (bf16 D 128, 2k and 8k, causal and not: 1.42-1.69x over the tutorial's shapes).
# "cpu" (the interpreter) uses tiles that keep tests fast.
DEFAULT_TILES = {
    ("sm90", 128): {"dkdv": (64, 64, 4, 2), "dq": (64, 64, 4, 2)},
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
    and, on a GPU, the kernels' shared memory. A dq_atomic spec runs no dQ kernel: of the dq.* tunables only the
    row tile counts (the preprocess and convert kernels' BLOCK_M), and they stage nothing in shared memory."""
    rows_only = ("dq",) if uses_atomic_dq(spec) else ()       # kernels whose BLOCK_N and stages nothing reads
    for kernel in KERNELS:
        block_m, block_n = config[f"{kernel}.BLOCK_M"], config[f"{kernel}.BLOCK_N"]
        if bucket is not None:
            if block_m > max(16, bucket[0]):
                return f"{kernel}.BLOCK_M={block_m} > seqlen_q bucket {bucket[0]}"
            if block_n > max(16, bucket[1]) and kernel not in rows_only:
                return f"{kernel}.BLOCK_N={block_n} > seqlen_k bucket {bucket[1]}"
        if spec["arch"] and kernel not in rows_only:
            limit, smem = smem_limit(spec["arch"]), smem_bytes(spec, config, kernel)
            if smem > limit:
                return f"{kernel}: shared memory {smem // 1024} KB > {limit // 1024} KB"
    return None


# Compute capabilities where a dense backward loads its tiles through tensor descriptors (the spec's tma). Empty:
# the descriptor path has not been timed against the pointer path on a card yet
# (benchmarks/probes/bwd_scheme_ab.py times both), so every card takes the pointer path.
TMA_ARCHS: frozenset[int] = frozenset()


def spec_of(call: AttnBwdCall, cc: int, aligned: bool = True) -> KernelSpec:
    """The spec for `call` on compute capability `cc` (0: interpreter); `aligned`: q, k, v and dout fit tensor
    descriptors (tma_ok). A dense call with a power-of-two head_dim takes the descriptor path (tma) where TMA_ARCHS
    lists cc; every other call, the pointer path. A varlen call's spec has varlen=True, an atomic-dQ one
    dq_atomic=True; otherwise the feature is absent (the templates read its absence as false), so the dense
    deterministic kernels' source, and the versions of their tuning records, are what they were before those
    features existed."""
    tma = cc in TMA_ARCHS and aligned and not call.varlen and call.head_dim == next_pow2(call.head_dim)
    optional = {name: True for name in ("varlen", "dq_atomic") if getattr(call, name)}
    return KernelSpec.make(OP_NAME, arch=int(cc), dtype=call.dtype, head_dim=int(call.head_dim),
                           causal=bool(call.causal), window=bool(call.window), softcap=bool(call.softcap),
                           alibi=bool(call.alibi), gqa_group=int(call.gqa_group), tma=tma, **optional)


def uses_atomic_dq(spec: KernelSpec) -> bool:
    """Whether `spec` runs the atomic-dQ scheme (no dQ kernel: the dK/dV kernel adds dq's parts)."""
    return spec.as_dict().get("dq_atomic", False)


def call_of(q, k, causal: bool, window: bool, softcap: bool, alibi: bool, dq_atomic: bool = False) -> AttnBwdCall:
    batch, seqlen_q, heads_q, head_dim = q.shape
    return AttnBwdCall(batch, seqlen_q, k.shape[1], heads_q, k.shape[2], head_dim, DTYPE_NAMES[q.dtype],
                       causal, window, softcap, alibi, dq_atomic=dq_atomic)


def varlen_call_of(q, k, batch: int, max_seqlen_q: int, max_seqlen_k: int, causal: bool, window: bool,
                   softcap: bool, alibi: bool, dq_atomic: bool = False) -> AttnBwdCall:
    """A packed call (q (total_q, Hq, D), k (total_k, Hkv, D)) as `batch` sequences of max_seqlen tokens."""
    _, heads_q, head_dim = q.shape
    return AttnBwdCall(batch, max_seqlen_q, max_seqlen_k, heads_q, k.shape[1], head_dim, DTYPE_NAMES[q.dtype],
                       causal, window, softcap, alibi, varlen=True, dq_atomic=dq_atomic)


# signature of a call (launch.signature of its _INPUTS, options and config override) -> its (preprocess, dkdv, dq)
# steps, or (preprocess, dkdv, convert) for the atomic scheme; forgotten when dispatch's configs change
# (dispatch.clear)
_plans = KeptPlans()

# Compute capabilities on which flash-attn's default, deterministic=False, runs the atomic-dQ scheme. Issue 26 lets
# the default use atomics only where they are faster, and the scheme has not been timed on a card yet
# (benchmarks/probes/bwd_scheme_ab.py times both beside cuDNN): none is listed, so every call runs the dQ kernel
# unless its caller asks for dq_atomic (the tuner, the probe, the tests).
ATOMIC_DQ_ARCHS: frozenset[int] = frozenset()


def dq_atomic_for(deterministic: bool, q: torch.Tensor) -> bool:
    """The scheme a backward of flash-attn's `deterministic` flag runs on q's device: atomic dQ only where the flag
    allows it and ATOMIC_DQ_ARCHS lists the device's compute capability."""
    return not deterministic and _arch(q) in ATOMIC_DQ_ARCHS


def attention_backward(dout, q, k, v, out, lse, softmax_scale: float, causal: bool, window_left: int,
                       window_right: int, softcap: float, alibi_slopes: torch.Tensor | None = None,
                       dlse: torch.Tensor | None = None, dq_atomic: bool = False, config: Config | None = None):
    """(dq, dk, dv) of flash_attn_func's forward, each in its input's shape and dtype, contiguous.

    dout: (B, Sq, Hq, D), q's dtype (any strides); q, k, v, alibi_slopes and the options: the forward's, checked
    (softmax_scale resolved; window sides -1 when unbounded, causal folded into window_right = 0). out: the
    forward's output (B, Sq, Hq, D); lse: its (B, Hq, Sq) fp32 log-sum-exp. dlse: None, or the (B, Hq, Sq)
    gradient of lse (d lse / d s = P, so it enters as delta - dlse). dq_atomic: the scheme (True: dq summed with
    fp32 atomics, its last bits may vary run to run; False: the dQ kernel, bit-identical runs; dq_atomic_for maps
    flash-attn's `deterministic` to it). `config` overrides dispatch.
    """
    if profiler.ACTIVE is not None:        # inside flashcore.profile(): timed and described
        return profiler.ACTIVE.measure(attention_backward, locals(), profiled)
    dout, dq, dk, dv = _start(dout, q, k, v)
    if q.numel() == 0 or k.numel() == 0:     # no query or no key: every gradient is 0
        return dq.zero_(), dk.zero_(), dv.zero_()
    batch, seqlen_q, heads_q, _ = q.shape
    call = (q, k, v, dout, out, lse, alibi_slopes, None, None, dq, dk, dv,
            torch.empty((batch, heads_q, seqlen_q), dtype=torch.float32, device=q.device), _dq_acc(q, dq_atomic))
    options = (softmax_scale, causal, window_left, window_right, softcap, dq_atomic)
    _run(call, options, config, dlse, lambda: _dense_plan(dict(zip(_SLOTS, call)), *options))
    return dq, dk, dv


def varlen_attention_backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int,
                              max_seqlen_k: int, softmax_scale: float, causal: bool, window_left: int,
                              window_right: int, softcap: float, alibi_slopes: torch.Tensor | None = None,
                              dlse: torch.Tensor | None = None, dq_atomic: bool = False,
                              config: Config | None = None):
    """(dq, dk, dv) of flash_attn_varlen_func's forward over packed K/V, each in its input's shape and dtype,
    contiguous.

    dout: (total_q, Hq, D), q's dtype (any strides); q (total_q, Hq, D), k, v (total_k, Hkv, D), cu_seqlens_q,
    cu_seqlens_k ((B + 1,) int32), max_seqlen_q, max_seqlen_k, alibi_slopes ((Hq,) or (B, Hq)) and the options: the
    forward's, checked (softmax_scale resolved; window sides -1 when unbounded, causal folded into window_right = 0).
    out: the forward's output (total_q, Hq, D); lse: its (Hq, total_q) fp32 log-sum-exp. dlse: None, or the
    (Hq, total_q) gradient of lse. dq_atomic: as attention_backward's. `config` overrides dispatch. No cu_seqlens
    value is read on the host (no sync): the kernels find each program's sequence as the forward's does.
    """
    if profiler.ACTIVE is not None:        # inside flashcore.profile(): timed and described
        return profiler.ACTIVE.measure(varlen_attention_backward, locals(), profiled_varlen)
    dout, dq, dk, dv = _start(dout, q, k, v)
    if q.numel() == 0 or k.numel() == 0:     # no query or no key: every gradient is 0
        return dq.zero_(), dk.zero_(), dv.zero_()
    call = (q, k, v, dout, out, lse, alibi_slopes, cu_seqlens_q, cu_seqlens_k, dq, dk, dv,
            torch.empty((q.shape[1], q.shape[0]), dtype=torch.float32, device=q.device), _dq_acc(q, dq_atomic))
    options = (max_seqlen_q, max_seqlen_k, softmax_scale, causal, window_left, window_right, softcap, dq_atomic)
    _run(call, options, config, dlse, lambda: _varlen_plan(dict(zip(_SLOTS, call)), *options))
    return dq, dk, dv


def profiled(dout, q, k, v, out, lse, softmax_scale, causal, window_left, window_right, softcap, alibi_slopes=None,
             dlse=None, dq_atomic=False, config=None) -> profiler.Described:
    """What flashcore.profile() records of an attention_backward call (its arguments): 2.5x the forward's FLOPs;
    it reads dout, q, k, v, out, lse (and dlse) and writes dq, dk, dv (dq_acc's traffic is not counted)."""
    batch, seqlen_q, heads_q, head_dim = q.shape
    call = call_of(q, k, causal, _has_window(causal, window_left, window_right), softcap > 0, alibi_slopes is not None,
                   dq_atomic)
    flops = BACKWARD_FLOPS * batch * useful_flops([seqlen_q], [k.shape[1]], heads_q, head_dim, causal,
                                                  (window_left, window_right))
    moved = nbytes(dout, q, k, v, out, lse, dlse) + nbytes(q, k, v)
    from . import OP
    spec = _spec(call, q, k, v, dout) if q.numel() and k.numel() else None
    return profiler.Described(OP_NAME, call.describe(), spec, OP.bucket_of(call), config, lambda: (flops, moved))


def profiled_varlen(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
                    causal, window_left, window_right, softcap, alibi_slopes=None, dlse=None, dq_atomic=False,
                    config=None) -> profiler.Described:
    """profiled() of a varlen_attention_backward call; the lengths are copied on the device now (no sync) and read
    when the profile closes."""
    total_q, heads_q, head_dim = q.shape
    call = varlen_call_of(q, k, cu_seqlens_q.shape[0] - 1, max_seqlen_q, max_seqlen_k, causal,
                          _has_window(causal, window_left, window_right), softcap > 0, alibi_slopes is not None,
                          dq_atomic)
    cu_q, cu_k = cu_seqlens_q.clone(), cu_seqlens_k.clone()
    moved = nbytes(dout, q, k, v, out, lse, dlse) + nbytes(q, k, v)

    def counts():
        seqlens_q, seqlens_k = (torch.diff(cu).tolist() for cu in (cu_q, cu_k))
        return BACKWARD_FLOPS * useful_flops(seqlens_q, seqlens_k, heads_q, head_dim, causal,
                                             (window_left, window_right)), moved
    from . import OP
    return profiler.Described(OP_NAME, call.describe(), _spec(call, q) if q.numel() and k.numel() else None,
                              OP.bucket_of(call), config, counts)


def _start(dout, q, k, v):
    """What every backward call begins with: a failure an earlier KV-cache or varlen call reported on this device
    raises; dout gets a unit stride on D (the kernels read rows with one; autograd may hand an expanded grad); dq,
    dk, dv are allocated in q's, k's and v's shapes and dtypes."""
    pending = REPORTERS.get(q.device)
    if pending is not None and pending.view[0]:
        raise_pending(q.device)
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    return (dout, *(torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v)))


def _dq_acc(q, dq_atomic: bool):
    """The atomic scheme's fp32 sums of dq, contiguous in q's shape (the preprocess kernel zeroes them); None for the
    dQ kernel's."""
    return torch.empty(q.shape, dtype=torch.float32, device=q.device) if dq_atomic else None


# a call's tensors in the order its kept steps read them, named as the kernels' parameters (None: absent): the
# inputs, which the signature covers, then the gradients, delta and dq_acc, allocated contiguous from the inputs'
# shapes
_INPUTS = ("Q", "K", "V", "DOut", "Out", "Lse", "Alibi", "CuSeqlensQ", "CuSeqlensK")
_SLOTS = _INPUTS + ("DQ", "DK", "DV", "Delta", "DQAcc")
_SLOT = {name: i for i, name in enumerate(_SLOTS)}
_DELTA = _SLOT["Delta"]


def _run(call: tuple, options: tuple, config: Config | None, dlse, plan) -> None:
    """Fills the gradients of `call` (its tensors, _SLOTS order): the kept steps of its signature, or on a
    signature's first call the steps `plan()` builds, each launched once as it is built, with `config` or else
    dispatch's (a tuned config that fails there falls back to the default: dispatch.first_launch)."""
    # (TMA_ARCHS: the load path a plan's spec took; a test or probe that lists a card gets plans of its own)
    key = signature(call[:len(_INPUTS)], (*options, TMA_ARCHS, None if config is None else tuple(config.items())))
    kept = _plans.get(key)
    if kept is None:
        spec, bwd_call, build = plan()
        if config is not None:
            _plans.put(key, _first_launches(build(config), call, dlse))
        else:
            from . import OP
            _plans.put(key, dispatch.first_launch(OP, spec, OP.bucket_of(bwd_call),
                                                  lambda config: _first_launches(build(config), call, dlse)))
        return
    preprocess, dkdv, last = kept
    stream = preprocess.plan.current_stream()      # (read once: the launches of a call share it)
    preprocess(call, stream)
    _subtract(call[_DELTA], dlse)
    dkdv(call, stream)
    last(call, stream)


def _first_launches(steps, call: tuple, dlse) -> tuple[Step, ...]:
    """The Steps of (kernel, grid, dynamic names, static arguments) steps over `call` (_SLOTS order), launched in
    order as they are built: delta (then minus dlse), then dK/dV and dQ, which read it (atomic scheme: dK/dV, then
    the convert of the dq parts it added)."""
    kept = []
    for kernel, grid, dynamic, static, descriptors in steps:
        kept.append(launched_step(kernel, grid, {name: _SLOT[name] for name in dynamic}, call, descriptors, **static))
        if len(kept) == 1:
            _subtract(call[_DELTA], dlse)
    return tuple(kept)


def _subtract(delta, dlse) -> None:
    """delta - dlse: the gradient of a returned lse that the loss reads (d lse / d s = P) joins dO's."""
    if dlse is not None:
        delta.sub_(dlse)


def _dense_plan(tensors: dict, softmax_scale, causal, window_left, window_right, softcap, dq_atomic):
    """A dense signature's (spec, call, build): build(config) gives its steps, grids over (blocks, heads, batch)."""
    q, k = tensors["Q"], tensors["K"]
    batch, seqlen_q, heads_q, _ = q.shape
    seqlen_k, heads_kv = k.shape[1], k.shape[2]
    if batch > MAX_GRID_YZ or heads_q > MAX_GRID_YZ:
        raise ValueError(f"q: batch ({batch}) and heads ({heads_q}) must each be at most {MAX_GRID_YZ} (CUDA grid "
                         "limit); split the batch")
    call = call_of(q, k, causal, _has_window(causal, window_left, window_right), softcap > 0,
                   tensors["Alibi"] is not None, dq_atomic)
    scalars = dict(num_heads_q=heads_q, seqlen_q=seqlen_q, seqlen_k=seqlen_k, softmax_scale=softmax_scale,
                   **score_args(softmax_scale, softcap, window_left, window_right, max(seqlen_q, seqlen_k)))
    spec = _spec(call, q, k, tensors["V"], tensors["DOut"])

    def build(config: Config) -> tuple:
        tile = _tiles(config)
        rows, keys = tile["dq"]["BLOCK_M"], tile["dkdv"]["BLOCK_N"]
        grids = ((triton.cdiv(seqlen_q, rows), heads_q, batch), (triton.cdiv(seqlen_k, keys), heads_kv, batch),
                 (triton.cdiv(seqlen_q, rows), heads_q, batch))
        return _steps(spec, tile, tensors, grids, scalars, ("Q", "K", "V", "DOut", "Lse", "Delta"),
                      preprocess=dict(num_heads_q=heads_q, seqlen_q=seqlen_q))
    return spec, call, build


def _varlen_plan(tensors: dict, max_seqlen_q, max_seqlen_k, softmax_scale, causal, window_left, window_right,
                 softcap, dq_atomic):
    """A packed signature's (spec, call, build): build(config) gives its steps, the preprocess (and the atomic
    scheme's convert) over the packed rows as one batch, dK/dV and dQ over (sequence, block) tiles, cdiv(total,
    BLOCK) + B of them (a bound from host-known sizes: no sync)."""
    q, k = tensors["Q"], tensors["K"]
    total_q, heads_q, _ = q.shape
    total_k, heads_kv = k.shape[0], k.shape[1]
    batch = tensors["CuSeqlensQ"].shape[0] - 1
    # the dK/dV kernel sweeps a sequence's q and dO rows in int32 from its first row (k, v: the forward's check)
    for name, t in (("q", q), ("dout", tensors["DOut"])):
        if max_seqlen_q * t.stride(0) >= 2**31:
            raise ValueError(f"{name}: max_seqlen_q {max_seqlen_q} x row stride {t.stride(0)} exceeds the backward "
                             "kernels' 32-bit row offsets within a sequence (2^31 elements); split the sequence")
    call = varlen_call_of(q, k, batch, max_seqlen_q, max_seqlen_k, causal,
                          _has_window(causal, window_left, window_right), softcap > 0, tensors["Alibi"] is not None,
                          dq_atomic)
    scalars = dict(batch=batch, total_q=total_q, total_k=total_k, max_seqlen_q=max_seqlen_q,
                   max_seqlen_k=max_seqlen_k, softmax_scale=softmax_scale,
                   SEQ_CHUNK=seq_chunk(batch),
                   **score_args(softmax_scale, softcap, window_left, window_right,
                                max(max_seqlen_q, max_seqlen_k, 1)))
    spec = _spec(call, q)

    def build(config: Config) -> tuple:
        tile = _tiles(config)
        rows, keys = tile["dq"]["BLOCK_M"], tile["dkdv"]["BLOCK_N"]
        grids = ((triton.cdiv(total_q, rows), heads_q, 1), (triton.cdiv(total_k, keys) + batch, heads_kv),
                 (triton.cdiv(total_q, rows) + batch, heads_q))
        return _steps(spec, tile, tensors, grids, scalars,
                      ("Q", "K", "V", "DOut", "Lse", "Delta", "CuSeqlensQ", "CuSeqlensK"),
                      preprocess=dict(num_heads_q=heads_q, seqlen_q=total_q))
    return spec, call, build


def _has_window(causal: bool, window_left: int, window_right: int) -> bool:
    return window_left >= 0 or (window_right >= 0 and not causal)


def _spec(call: AttnBwdCall, q, *operands) -> KernelSpec:
    """The spec of `call` on q's device; q and `operands` (a dense call's k, v, dout) decide whether their
    alignment allows tensor descriptors."""
    return spec_of(call, _arch(q), aligned=tma_ok(q, *operands))


def _arch(q) -> int:
    return arch(q.device.index or 0) if q.is_cuda else 0


def _tiles(config: Config) -> dict:
    """Per kernel, its launch tiles in `config`."""
    return {kernel: {name: config[f"{kernel}.{name}"] for name in ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")}
            for kernel in KERNELS}


# each tensor's prefix in the kernels' stride names (stride_qb, stride_qs, stride_qh, ...)
_STRIDES = {"Q": "q", "K": "k", "V": "v", "Out": "o", "DOut": "do", "DQ": "dq", "DK": "dk", "DV": "dv",
            "DQAcc": "dqa"}


def _strides(tensors: dict, *names: str) -> dict:
    """The named tensors' strides as the kernels take them: b, s, h of a (B, S, H, D) tensor, s, h of a packed
    (total, H, D) one (the unit stride on D is not passed)."""
    strides = {}
    for name in names:
        t = tensors[name]
        strides.update({f"stride_{_STRIDES[name]}{axis}": stride
                        for axis, stride in zip("bsh"[4 - t.dim():], t.stride())})
    return strides


def _row_strides(tensors: dict, *names: str) -> dict:
    """_strides for the kernels over rows alone (preprocess, convert), which see a packed (total, H, D) tensor as
    one batch: its batch stride 0."""
    return {f"stride_{_STRIDES[name]}b": 0 for name in names} | _strides(tensors, *names)


def _steps(spec: KernelSpec, tile: dict, tensors: dict, grids: tuple, scalars: dict, dynamic: tuple,
           preprocess: dict) -> tuple:
    """(kernel, grid, dynamic names, static arguments, descriptor blocks) of the preprocess, dK/dV and dQ kernels,
    or for a dq_atomic spec of the preprocess, dK/dV and convert kernels: `scalars` and the tensors named in
    `dynamic` are the layout's arguments both main kernels take, `preprocess` the preprocess kernel's (num_heads_q,
    seqlen_q: its rows); the preprocess and the convert run on the dQ kernel's row tile and warps, over the
    preprocess's grid. A tma spec's main kernels take Q, K, V, DOut as descriptors of their own tiles."""
    common = dict(scalars, **_strides(tensors, "Q", "K", "V", "DOut"))
    if tensors["Alibi"] is not None:
        common.update(alibi_args(tensors["Alibi"]))
        dynamic += ("Alibi",)
    preprocess_grid, dkdv_grid, dq_grid = grids
    # atomic dQ: the preprocess zeroes dq_acc, dK/dV adds dq's parts into it, the convert scales it into dq
    acc = ("DQAcc",) if uses_atomic_dq(spec) else ()
    rows = dict(BLOCK_M=tile["dq"]["BLOCK_M"], num_warps=tile["dq"]["num_warps"])

    def descriptors(kernel: str) -> dict:
        """tma: the kernel's q and dO row tiles, k and v key tiles, over (B, S, H, D)."""
        if not spec["tma"]:
            return {}
        d, m, n = next_pow2(spec["head_dim"]), tile[kernel]["BLOCK_M"], tile[kernel]["BLOCK_N"]
        return {"Q": [1, m, 1, d], "DOut": [1, m, 1, d], "K": [1, n, 1, d], "V": [1, n, 1, d]}
    steps = ((load(spec, "attn_bwd_preprocess").attn_bwd_preprocess, preprocess_grid, ("Out", "DOut", "Delta") + acc,
              dict(preprocess, **_row_strides(tensors, "Out", "DOut", *acc), **rows), {}),
             (load(spec, "attn_bwd_dkdv").attn_bwd_dkdv, dkdv_grid, dynamic + ("DK", "DV") + acc,
              dict(common, **_strides(tensors, "DK", "DV", *acc), **tile["dkdv"]), descriptors("dkdv")))
    if acc:
        return steps + ((load(spec, "attn_bwd_preprocess").attn_bwd_dq_convert, preprocess_grid, ("DQAcc", "DQ"),
                         dict(_row_strides(tensors, "DQAcc", "DQ"), seqlen_q=preprocess["seqlen_q"],
                              softmax_scale=scalars["softmax_scale"], **rows), {}),)
    return steps + ((load(spec, "attn_bwd_dq").attn_bwd_dq, dq_grid, dynamic + ("DQ",),
                     dict(common, **_strides(tensors, "DQ"), **tile["dq"]), descriptors("dq")),)
