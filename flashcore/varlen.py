"""flash_attn_varlen_func and its packed variants: attention over packed sequences of mixed lengths, K/V packed
the same way or in a paged KV cache (chunked prefill, prefix caching); flash-attn's functions, argument for
argument.

Eager calls go straight to the op's host code (flashcore/ops/attn_varlen/host.py): after the first call of a
signature, a dict lookup and one kept launch. Under torch.compile the call is a torch.library custom op with a fake
implementation. A call autograd records (an input requires grad) goes through the custom op too, whose registered
backward (packed K/V only) runs flashcore/ops/attn_bwd's varlen kernels. No call reads cu_seqlens on the host (no
sync) unless the values are the host's anyway (CPU tensors) or $FLASHCORE_KV_CHECKS=strict: CUDA graphs capture
it, and replay it with other lengths and block tables within the captured totals and max_seqlen.
"""
from __future__ import annotations

import torch

from . import checks
from .ops.attn_bwd.host import dq_atomic_for, varlen_attention_backward
from .ops.attn_varlen.host import varlen_attention

INDEX_DTYPE = torch.int32


@torch.library.custom_op("flashcore::attn_varlen", mutates_args=())
def _attn_varlen_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                    cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float,
                    causal: bool, window_left: int, window_right: int, softcap: float, return_lse: bool,
                    alibi_slopes: torch.Tensor | None, block_table: torch.Tensor | None,
                    deterministic: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    # (the tensor checks run on a signature's first call, as on the eager path: this op is how training calls run;
    # deterministic only picks the backward's scheme)
    out, lse = varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
                                causal, window_left, window_right, softcap, return_lse, alibi_slopes, block_table,
                                check=check_varlen_inputs)
    return out, lse if lse is not None else q.new_empty((0,), dtype=torch.float32)


@_attn_varlen_op.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal, window_left,
      window_right, softcap, return_lse, alibi_slopes, block_table, deterministic=False):
    total_q, heads_q, _ = q.shape
    lse_shape = (heads_q, total_q) if return_lse else (0,)
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(lse_shape, dtype=torch.float32)


@torch.library.custom_op("flashcore::attn_varlen_bwd", mutates_args=())
def _attn_varlen_bwd_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                        lse: torch.Tensor, dlse: torch.Tensor | None, cu_seqlens_q: torch.Tensor,
                        cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float,
                        causal: bool, window_left: int, window_right: int, softcap: float,
                        alibi_slopes: torch.Tensor | None,
                        deterministic: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return varlen_attention_backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                     softmax_scale, causal, window_left, window_right, softcap, alibi_slopes, dlse,
                                     dq_atomic_for(deterministic, q))


@_attn_varlen_bwd_op.register_fake
def _(dout, q, k, v, out, lse, dlse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
      window_left, window_right, softcap, alibi_slopes, deterministic=False):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_backward(ctx, inputs, output) -> None:
    """Saves what the backward recomputes P from: q, k, v, cu_seqlens, alibi_slopes, and the forward's out and fp32
    lse (the caller asks for the lse whenever a gradient is needed: return_lse=True), and which backward to run
    (deterministic). Packed K/V only:
    flash_attn_varlen_func refuses a paged call that needs grad before it gets here; a direct call of the op that
    would need what was not kept raises in the backward, never a wrong gradient."""
    (q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal, window_left,
     window_right, softcap, return_lse, alibi_slopes, block_table, deterministic) = inputs
    out, lse = output
    ctx.unsupported = ("a paged call (block_table)" if block_table is not None else
                       "a call without return_lse=True" if not return_lse else None)
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, alibi_slopes)
    ctx.options = (max_seqlen_q, max_seqlen_k, softmax_scale, causal, window_left, window_right, softcap)
    ctx.deterministic = deterministic
    ctx.set_materialize_grads(False)     # an unused lse (or out) gets None, not a tensor of zeros to read


def _backward(ctx, dout, dlse):
    """(dq, dk, dv) in q's, k's and v's shapes and dtypes; cu_seqlens, the options and alibi_slopes get none."""
    if ctx.unsupported:
        raise NotImplementedError(f"flashcore::attn_varlen has no backward for {ctx.unsupported}")
    q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, alibi_slopes = ctx.saved_tensors
    if dout is None:      # only the lse was used
        dout = torch.zeros_like(out)
    max_seqlen_q, max_seqlen_k, *options = ctx.options
    dq, dk, dv = _attn_varlen_bwd_op(dout, q, k, v, out, lse, dlse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                     max_seqlen_k, *options, alibi_slopes, ctx.deterministic)
    return (dq, dk, dv) + (None,) * 13


_attn_varlen_op.register_autograd(_backward, setup_context=_setup_backward)


def flash_attn_varlen_func(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                           cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, dropout_p: float = 0.0,
                           softmax_scale: float | None = None, causal: bool = False,
                           window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                           alibi_slopes: torch.Tensor | None = None, deterministic: bool = False,
                           return_attn_probs: bool = False, block_table: torch.Tensor | None = None):
    """Attention over a batch of sequences of mixed lengths packed along the token dimension; flash-attn's
    `flash_attn_varlen_func`, argument for argument and in its order.

    Args:
        q: (total_q, Hq, D), float16 / bfloat16 / float32, CUDA (CPU under TRITON_INTERPRET=1: fp16 / fp32).
           Sequence b's query tokens are rows cu_seqlens_q[b] .. cu_seqlens_q[b + 1] - 1.
        k, v: (total_k, Hkv, D) packed like q (rows cu_seqlens_k[b] ..), or with block_table a paged KV cache
           (num_blocks, block_size, Hkv, D), any block_size: key j of sequence b lives in block
           block_table[b, j // block_size] at row j % block_size. Same dtype and device as q, unit stride on D,
           any other strides (views of a packed qkv / kv work, no copy); Hq a multiple of Hkv (MQA / GQA).
           D: multiple of 8 in [16, 256].
        cu_seqlens_q, cu_seqlens_k: (B + 1,) int32 on q's device: 0, then the running totals of each sequence's
           query tokens / keys (with block_table: keys in the cache, the prefix and the new tokens together).
        max_seqlen_q, max_seqlen_k: ints, at least every sequence's length (they size the buckets, never the
           results; keep them fixed to replay a CUDA graph over changing lengths).
        dropout_p: must be 0.0 (NotImplementedError otherwise).
        softmax_scale: default 1 / sqrt(D).
        causal: bottom-right aligned per sequence: query i of sequence b sits at position
           i + seqlen_k[b] - seqlen_q[b] and sees keys j <= that position (chunked prefill: the new tokens see the
           whole prefix and each other causally). A query that sees no key gives 0 (lse -inf).
        window_size: (left, right), -1 unbounded: the query at position p sees keys p - left <= j <= p + right.
        softcap: if > 0, scores s become softcap * tanh(s / softcap).
        alibi_slopes: (Hq,) or (B, Hq) float32: bias -slope * |p - j|.
        deterministic: as flash_attn_func's: True gives bit-identical gradients; False (default) allows the
           atomic-dQ backward where it was measured faster (none yet).
        return_attn_probs: also return the log-sum-exp and None: (out, softmax_lse, None).
        block_table: optional (B, max_blocks) int32: k / v are a paged cache; entries past a sequence's keys are
           not read.

    Returns:
        out: (total_q, Hq, D), dtype of q, contiguous.
        softmax_lse (with return_attn_probs): (Hq, total_q), float32, natural log.

    Value checks: cu_seqlens rising from 0 (q's to total_q; packed k's to total_k), lengths within max_seqlen and
    the block table's capacity, the used block-table entries in [0, num_blocks). CPU tensors raise a ValueError at
    the call; on a GPU the kernel checks without a device sync: a failing sequence gets NaN and the next FlashCore
    call on the device (or flashcore.check_errors()) raises naming the argument ($FLASHCORE_KV_CHECKS=strict: at
    the call, one sync). Nothing outside the tensors is read or written, whatever the values.

    Backward: when grad mode is on and q, k or v requires grad, the call is recorded by autograd (through the
    custom op flashcore::attn_varlen, which torch.compile traces too) and backward() gives dq (total_q, Hq, D), dk
    and dv (total_k, Hkv, D) in the inputs' dtypes, for every option above (GQA / MQA: dk, dv summed over each kv
    head's query heads); sequences of length 0 and rows that see no key get zero gradients; alibi_slopes get none;
    a returned softmax_lse that the loss reads is differentiated too. The forward then also computes the lse (saved
    for the backward). With block_table (a paged KV cache) such a call raises NotImplementedError: there is no
    paged backward (call it under torch.no_grad() / torch.inference_mode(), or detach the inputs).
    """
    needs_grad = checks.needs_grad(q, k, v)
    if needs_grad and block_table is not None:
        checks.refuse_gradients("flash_attn_varlen_func", "FlashCore's backward takes packed k / v, not a paged KV "
                                "cache (block_table)", q=q, k=k, v=v)
    checks.check_dropout(dropout_p)
    checks.check_softmax_scale(softmax_scale)
    checks.check_window(window_size)
    checks.check_softcap(softcap)
    checks.check_flags(causal=causal, deterministic=deterministic, return_attn_probs=return_attn_probs)
    _check_max_seqlen(max_seqlen_q, max_seqlen_k)
    window_left, window_right = window_size
    if causal:
        window_right = 0

    # autograd records the custom op (its backward: _backward); the eager fast path below records nothing
    if needs_grad or torch.compiler.is_compiling():
        # the op's tensor checks run on a signature's first call; here only where they would not: in a trace (the
        # fake implementation checks nothing) and for a non-tensor, which the op's schema would meet first
        if torch.compiler.is_compiling() or not checks.all_tensors(q, k, v, cu_seqlens_q, cu_seqlens_k,
                                                                     alibi_slopes, block_table):
            check_varlen_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, alibi_slopes,
                                block_table)
        scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
        out, lse = _attn_varlen_op(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, causal,
                                   int(window_left), int(window_right), float(softcap),
                                   return_attn_probs or needs_grad, alibi_slopes, block_table, deterministic)
    else:       # the tensors' checks run on the first call of each signature (a module-level function: the plan's
        #         key holds it, so a per-call closure would make every call a new signature)
        out, lse = varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
                                    causal, window_left, window_right, softcap, return_attn_probs, alibi_slopes,
                                    block_table, check=check_varlen_inputs)
    return (out, lse, None) if return_attn_probs else out


def flash_attn_varlen_kvpacked_func(q: torch.Tensor, kv: torch.Tensor, cu_seqlens_q: torch.Tensor,
                                    cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int,
                                    dropout_p: float = 0.0, softmax_scale: float | None = None, causal: bool = False,
                                    window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                                    alibi_slopes: torch.Tensor | None = None, deterministic: bool = False,
                                    return_attn_probs: bool = False):
    """flash_attn_varlen_func with k and v packed: kv (total_k, 2, Hkv, D); k = kv[:, 0], v = kv[:, 1] as strided
    views (no copy), so backward() gives kv a packed gradient. flash-attn's `flash_attn_varlen_kvpacked_func`."""
    checks.check_packed("kv", kv, 2, batched=False)
    return flash_attn_varlen_func(q, kv[:, 0], kv[:, 1], cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                  dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                                  return_attn_probs)


def flash_attn_varlen_qkvpacked_func(qkv: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                                     dropout_p: float = 0.0, softmax_scale: float | None = None, causal: bool = False,
                                     window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                                     alibi_slopes: torch.Tensor | None = None, deterministic: bool = False,
                                     return_attn_probs: bool = False):
    """flash_attn_varlen_func with q, k, v packed: qkv (total, 3, H, D); strided views, no copy (self-attention:
    the same cu_seqlens and max_seqlen for queries and keys), so backward() gives qkv a packed gradient. flash-attn's
    `flash_attn_varlen_qkvpacked_func`."""
    checks.check_packed("qkv", qkv, 3, batched=False)
    return flash_attn_varlen_func(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                                  dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                                  return_attn_probs)


def _check_max_seqlen(max_seqlen_q, max_seqlen_k) -> None:
    """Ints >= 0. Checked on every call: 5.0 or True would find the kept plan of 5 or 1 (equal keys)."""
    for name, value in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{name} must be an int >= 0, got {type(value).__name__} {value!r}")
        if value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value}")


def _check_index(name: str, t, q, rank: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be an int32 torch.Tensor, got {type(t).__name__}")
    if t.dtype != INDEX_DTYPE:
        raise TypeError(f"{name} must be int32, got {t.dtype}")
    if t.dim() != rank:
        raise ValueError(f"{name} must have {rank} dimension{'s' * (rank > 1)}, got shape {tuple(t.shape)}")
    if t.device != q.device:
        raise ValueError(f"{name} is on {t.device} but q is on {q.device}; they must match")
    if t.numel() and t.stride(-1) != 1 and t.shape[-1] > 1:
        raise ValueError(f"{name} must be contiguous in its last dimension, got strides {t.stride()}")


def check_varlen_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, alibi_slopes,
                        block_table) -> None:
    """Types, shapes, dtypes and devices of a varlen call's tensors, and its max_seqlen: what the plan key holds,
    so they run on a signature's first call only. Values (the cu_seqlens entries) are the value checks'."""
    paged = block_table is not None
    checks.check_q_and_kv(q, k, v, q_layout=checks.PACKED, kv_layout=checks.PAGED if paged else checks.PACKED)
    _check_index("cu_seqlens_q", cu_seqlens_q, q, 1)
    _check_index("cu_seqlens_k", cu_seqlens_k, q, 1)
    if cu_seqlens_q.shape[0] < 1 or cu_seqlens_k.shape != cu_seqlens_q.shape:
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must both have shape (batch + 1,), got "
                         f"{tuple(cu_seqlens_q.shape)} and {tuple(cu_seqlens_k.shape)}")
    batch = cu_seqlens_q.shape[0] - 1
    _check_max_seqlen(max_seqlen_q, max_seqlen_k)
    if batch == 0 and q.shape[0]:
        raise ValueError(f"cu_seqlens_q has no sequence (shape (1,)) but q has {q.shape[0]} rows")
    if paged:
        _check_index("block_table", block_table, q, 2)
        if block_table.shape[0] != batch or block_table.shape[1] == 0:
            raise ValueError(f"block_table must have shape (batch {batch}, max_blocks >= 1), got "
                             f"{tuple(block_table.shape)}")
        if k.shape[0] == 0 or k.shape[1] == 0:
            raise ValueError(f"k must be a paged cache {checks.PAGED} with at least one block, got {tuple(k.shape)}")
    # within a sequence the kernel offsets packed k / v rows in int32 from an int64 start (q's rows are int64)
    if not paged:
        for name, t in (("k", k), ("v", v)):
            if max_seqlen_k * t.stride(0) >= 2**31:
                raise ValueError(f"{name}: max_seqlen_k {max_seqlen_k} x row stride {t.stride(0)} exceeds the kernel's "
                                 "32-bit row offsets within a sequence (2^31 elements); split the sequence")
    if alibi_slopes is not None:
        checks.check_alibi_slopes(alibi_slopes, q, batch)
    if max(max_seqlen_q, max_seqlen_k) >= 2**30:        # (positions plus a window side stay in int32)
        raise ValueError(f"max_seqlen_q and max_seqlen_k must be below 2^30, got {max_seqlen_q}, {max_seqlen_k}")
