"""flash_attn_with_kvcache: attention against a KV cache (contiguous or paged), with the in-place append of new
tokens; flash-attn's function, argument for argument.

Eager calls go straight to the op's host code (flashcore/ops/attn_decode/host.py): after the first call of a
signature, a dict lookup and 1-3 kept kernel launches, which check the values they use (no device sync by
default). Under torch.compile the call is a torch.library custom op that mutates the caches.
"""
from __future__ import annotations

import torch

from . import checks, profiler
from .device import interpreter_mode
from .ops.attn_decode.host import decode_attention, kept_plan, signature

INDEX_DTYPE = torch.int32


@torch.library.custom_op("flashcore::attn_decode", mutates_args=("k_cache", "v_cache"))
def _attn_decode_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor | None,
                    v: torch.Tensor | None, rotary_cos: torch.Tensor | None, rotary_sin: torch.Tensor | None,
                    cache_seqlens: torch.Tensor | None, cache_seqlen: int, cache_batch_idx: torch.Tensor | None,
                    cache_leftpad: torch.Tensor | None, block_table: torch.Tensor | None, softmax_scale: float,
                    causal: bool, window_left: int, window_right: int, softcap: float, rotary_interleaved: bool,
                    alibi_slopes: torch.Tensor | None, num_splits: int,
                    return_lse: bool) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse = decode_attention(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_seqlen,
                                cache_batch_idx, cache_leftpad, block_table, softmax_scale, causal, window_left,
                                window_right, softcap, rotary_interleaved, alibi_slopes, num_splits, return_lse)
    return out, lse if lse is not None else q.new_empty((0,), dtype=torch.float32)


@_attn_decode_op.register_fake
def _(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_seqlen, cache_batch_idx,
      cache_leftpad, block_table, softmax_scale, causal, window_left, window_right, softcap, rotary_interleaved,
      alibi_slopes, num_splits, return_lse):
    batch, seqlen_q, heads_q, _ = q.shape
    lse_shape = (batch, heads_q, seqlen_q) if return_lse else (0,)
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(lse_shape, dtype=torch.float32)


def flash_attn_with_kvcache(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            k: torch.Tensor | None = None, v: torch.Tensor | None = None,
                            rotary_cos: torch.Tensor | None = None, rotary_sin: torch.Tensor | None = None,
                            cache_seqlens: int | torch.Tensor | None = None,
                            cache_batch_idx: torch.Tensor | None = None, cache_leftpad: torch.Tensor | None = None,
                            block_table: torch.Tensor | None = None, softmax_scale: float | None = None,
                            causal: bool = False, window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                            rotary_interleaved: bool = True, alibi_slopes: torch.Tensor | None = None,
                            num_splits: int = 0, return_softmax_lse: bool = False):
    """Attention of q against a KV cache, after appending k / v to it in place; flash-attn's
    `flash_attn_with_kvcache`, argument for argument and in its order.

    Args:
        q: (B, Sq, Hq, D), float16 / bfloat16 / float32 (CPU under TRITON_INTERPRET=1: fp16 / fp32). Sq is
           small in decoding (1; a few for speculative decoding): Sq * Hq / Hkv <= 128 (one tile of query rows
           per kv head, e.g. 16 tokens at GQA 8).
        k_cache, v_cache: contiguous cache (B_cache, S_cache, Hkv, D), or with block_table a paged cache
           (num_blocks, block_size, Hkv, D), any block_size >= 1; dtype and device of q, unit stride on D.
           Hq must be a multiple of Hkv (MQA / GQA). Capacity per sequence: S_cache, or
           block_table.shape[1] * block_size.
        k, v: optional new tokens (B, S_new, Hkv, D), both or neither; written into the cache in place at
           positions cache_seqlens[b] .. cache_seqlens[b] + S_new - 1 of sequence b before attending (with
           rotary applied to k first). No other cache slot is touched.
        rotary_cos, rotary_sin: optional (seqlen_ro, rotary_dim / 2), dtype of q, rotary_dim <= D; only with k /
           v. New k token t rotates at position cache_seqlens[b] + t; q token i at cache_seqlens[b] + i when
           causal or a window is set, else every q token at cache_seqlens[b]. The first rotary_dim features of
           each head rotate, as pairs (x[2i], x[2i+1]) if rotary_interleaved (GPT-J) else halves
           (x[i], x[i + rotary_dim/2]) (GPT-NeoX).
        cache_seqlens: int, or (B,) int32 on q's device: tokens already in each sequence's cache. None: the whole
           capacity (then k / v cannot be appended).
        cache_batch_idx: optional (B,) int32: the cache row of each sequence (contiguous caches only); else b.
        cache_leftpad: optional (B,) int32: the first valid key of each sequence (keys below it are ignored).
        block_table: optional (B, max_blocks) int32: position p of sequence b lives in block
           block_table[b, p // block_size], at row p % block_size. Entries past a sequence's length are unread.
        softmax_scale: default 1 / sqrt(D).
        causal: bottom-right aligned: with seqlen_k[b] = cache_seqlens[b] + S_new keys, query i sits at
           position seqlen_k[b] - Sq + i and sees keys j <= that position.
        window_size: (left, right), -1 unbounded: query at position p sees keys p - left <= j <= p + right.
        softcap: if > 0, scores s become softcap * tanh(s / softcap).
        alibi_slopes: optional (Hq,) or (B, Hq) float32: bias -slope * |p - j|.
        num_splits: split-KV parts per (sequence, kv head); 0 lets FlashCore choose (tuned config, else a
           heuristic from the SM count and the batch). Any n > 0 is honoured (capped at 128 and at one key block
           per split).
        return_softmax_lse: also return the log-sum-exp.

    Returns:
        out: (B, Sq, Hq, D), dtype of q, contiguous; a query that sees no key gives 0.
        softmax_lse (with return_softmax_lse): (B, Hq, Sq), float32, natural log (-inf where no key is seen).

    Value checks: cache overflow, negative lengths, leftpad beyond the length, cache_batch_idx and the used
    block-table entries in range, rotary tables long enough. Values the host holds raise a ValueError at the call:
    an int cache_seqlens, and CPU tensors (the interpreter). For GPU tensors the append and decode kernels check
    before they write, without a device sync (in CUDA-graph replays too): a sequence that fails has none of its
    slots written and NaN outputs, and the next FlashCore call on the device (any function), or
    flashcore.check_errors(), raises a ValueError naming the argument and the failing call; one still pending at
    exit is printed as a warning. $FLASHCORE_KV_CHECKS=strict raises at the failing eager call instead (one device
    sync per call), =0 skips the tensor checks (read at the first call, and again after flashcore.dispatch.clear()).
    In every mode the kernels skip whatever slot they cannot address in bounds: nothing outside the caches is read
    or written.

    No backward pass (as flash-attn's): with grad mode on, a tensor argument that requires grad raises
    NotImplementedError (run it under torch.no_grad() or torch.inference_mode()).
    """
    if checks.needs_grad(q, k_cache, v_cache, k, v):
        checks.refuse_gradients("flash_attn_with_kvcache", "it has no backward pass (flash-attn's has none either)",
                                q=q, k_cache=k_cache, v_cache=v_cache, k=k, v=v)
    # the hot path (eager): a signature seen before, whose checks passed, runs its kept plan
    seqlens = cache_seqlens if isinstance(cache_seqlens, torch.Tensor) else None
    compiling = torch.compiler.is_compiling()
    key = None
    if not compiling:
        try:
            options = ("api", None if seqlens is not None else cache_seqlens, softmax_scale, causal, *window_size,
                       softcap, rotary_interleaved, num_splits, return_softmax_lse)
        except TypeError:     # window_size is not a pair: check_window says so
            options = None
        inputs = (q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, seqlens, cache_batch_idx, cache_leftpad,
                  block_table, alibi_slopes)
        key = None if options is None else signature(inputs, options)
        if profiler.ACTIVE is None and (plan := kept_plan(key)) is not None:    # (a profiled call: the host's)
            out, lse = plan.run(inputs)
            return (out, lse) if return_softmax_lse else out

    # -- a new signature: the checks, then the plan (kept under `key` once it launched) --
    checks.check_softmax_scale(softmax_scale)
    checks.check_window(window_size)
    checks.check_softcap(softcap)
    checks.check_flags(causal=causal, rotary_interleaved=rotary_interleaved, return_softmax_lse=return_softmax_lse)
    if not isinstance(num_splits, int) or isinstance(num_splits, bool) or num_splits < 0:
        raise ValueError(f"num_splits must be an int >= 0 (0: FlashCore chooses), got {num_splits!r}")
    if softmax_scale is None and isinstance(q, torch.Tensor):
        softmax_scale = q.shape[-1] ** -0.5
    window_left, window_right = window_size
    if causal:
        window_right = 0
    seqlen_int = cache_seqlens if isinstance(cache_seqlens, int) else 0   # (a bool stays one: the checks refuse it)

    def validate():
        check_kvcache_inputs(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx,
                             cache_leftpad, block_table, alibi_slopes, q_per_token=causal or window_left >= 0
                             or window_right >= 0)

    if cache_seqlens is None and isinstance(k_cache, torch.Tensor) and k_cache.dim() == 4:
        seqlen_int = k_cache.shape[1] * (block_table.shape[1] if isinstance(block_table, torch.Tensor) else 1)
    args = (q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, seqlens, seqlen_int, cache_batch_idx,
            cache_leftpad, block_table, softmax_scale, causal, window_left, window_right, softcap,
            rotary_interleaved, alibi_slopes, num_splits, return_softmax_lse)
    if compiling:
        validate()
        out, lse = _attn_decode_op(*args)
    else:
        if key is None:
            validate()      # (names the argument that is not a tensor)
        out, lse = decode_attention(*args, validate=validate, key=key)
    return (out, lse) if return_softmax_lse else out


def _check_index(name: str, t, shape: tuple[int, ...], q) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
    if t.dtype != INDEX_DTYPE:
        raise TypeError(f"{name} must be int32, got {t.dtype}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    if t.device != q.device:
        raise ValueError(f"{name} is on {t.device} but q is on {q.device}; they must match")
    if t.dim() and t.stride(-1) != 1 and t.shape[-1] > 1:
        raise ValueError(f"{name} must be contiguous in its last dimension, got strides {t.stride()}")


def check_kvcache_inputs(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx,
                         cache_leftpad, block_table, alibi_slopes, q_per_token: bool = False) -> None:
    """Types, shapes, dtypes and devices of a flash_attn_with_kvcache call's tensors, and an int cache_seqlens's
    value (what the plan key holds, so they run on the first call of each signature only). `q_per_token`: q's
    tokens rotate at their own positions (causal or a window), so the rotary tables must reach the last one."""
    interpret = interpreter_mode()
    checks.check_q_and_kv(q, k_cache, v_cache, "k_cache", "v_cache")
    batch, seqlen_q, heads_q, head_dim = q.shape
    heads_kv = k_cache.shape[2]
    checks.check_decode_rows(seqlen_q, heads_q, heads_kv)
    if batch == 0 or seqlen_q == 0:
        raise ValueError(f"q must have at least one sequence and one query token, got shape {tuple(q.shape)}")
    if k_cache.shape[1] == 0:
        raise ValueError(f"k_cache has no room: shape {tuple(k_cache.shape)}")
    if (k is None) != (v is None):
        raise ValueError("k and v must be given together (new tokens to append), got only "
                         f"{'k' if v is None else 'v'}")
    if k is not None:
        checks.check_attention_inputs(q, k, v)
        if k.shape[2] != heads_kv:
            raise ValueError(f"k must have shape (batch {batch}, new tokens, heads {heads_kv}, head_dim {head_dim}) "
                             f"matching q and the cache, got {tuple(k.shape)}")
        if cache_seqlens is None:
            raise ValueError("appending k / v needs cache_seqlens (where the new tokens go)")
    if isinstance(cache_seqlens, torch.Tensor):
        _check_index("cache_seqlens", cache_seqlens, (batch,), q)
    elif cache_seqlens is not None and (not isinstance(cache_seqlens, int) or isinstance(cache_seqlens, bool)):
        raise TypeError(f"cache_seqlens must be an int, a (B,) int32 tensor or None, got "
                        f"{type(cache_seqlens).__name__}")
    if block_table is not None:
        if not isinstance(block_table, torch.Tensor) or block_table.dim() != 2:
            raise ValueError(f"block_table must be a (batch, max_blocks) int32 tensor, got "
                             f"{getattr(block_table, 'shape', type(block_table).__name__)}")
        _check_index("block_table", block_table, (batch, block_table.shape[1]), q)
        if block_table.shape[1] == 0:
            raise ValueError("block_table must have at least one column (max_blocks >= 1)")
        if cache_batch_idx is not None:
            raise ValueError("cache_batch_idx is for contiguous caches; a paged cache (block_table) maps sequences "
                             "through the block table")
    elif k_cache.shape[0] == 0:
        raise ValueError("k_cache has no batch row")
    if cache_batch_idx is not None:
        _check_index("cache_batch_idx", cache_batch_idx, (batch,), q)
    elif block_table is None and k_cache.shape[0] < batch:
        raise ValueError(f"k_cache has {k_cache.shape[0]} batch rows but q has batch {batch} (pass cache_batch_idx "
                         "to pick rows)")
    if cache_leftpad is not None:
        _check_index("cache_leftpad", cache_leftpad, (batch,), q)
    if (rotary_cos is None) != (rotary_sin is None):
        raise ValueError("rotary_cos and rotary_sin must be given together")
    if rotary_cos is not None:
        if k is None:
            raise ValueError("rotary_cos / rotary_sin rotate the new k and q: they need k and v")
        for name, t in (("rotary_cos", rotary_cos), ("rotary_sin", rotary_sin)):
            checks.check_tensor(name, t, 2, interpret, "(seqlen_ro, rotary_dim / 2)")
        checks.check_same(("q", "rotary_cos", "rotary_sin"), (q, rotary_cos, rotary_sin))
        if rotary_cos.shape != rotary_sin.shape:
            raise ValueError(f"rotary_cos and rotary_sin must have the same shape, got {tuple(rotary_cos.shape)} "
                             f"and {tuple(rotary_sin.shape)}")
        if not 1 <= 2 * rotary_cos.shape[1] <= head_dim:
            raise ValueError(f"rotary_cos must have shape (seqlen_ro, rotary_dim / 2) with rotary_dim <= head_dim "
                             f"({head_dim}), got {tuple(rotary_cos.shape)}")
    if alibi_slopes is not None:
        checks.check_alibi_slopes(alibi_slopes, q)
    if isinstance(cache_seqlens, int):
        _check_int_seqlens(cache_seqlens, k_cache.shape[1] * (1 if block_table is None else block_table.shape[1]),
                           0 if k is None else k.shape[1], rotary_cos, seqlen_q if q_per_token else 1)


def _check_int_seqlens(seqlen: int, capacity: int, seqlen_new: int, rotary_cos, rotary_q_span: int) -> None:
    """An int cache_seqlens is the host's: its checks raise here, at the call (the kernels' device-side checks
    of the same rules cover tensors: templates/macros/value_checks.jinja)."""
    if seqlen < 0:
        raise ValueError(f"cache_seqlens = {seqlen} is negative")
    if seqlen + seqlen_new > capacity:
        raise ValueError(f"cache overflow: cache_seqlens = {seqlen} plus {seqlen_new} new tokens exceeds the cache "
                         f"capacity of {capacity} tokens per sequence")
    if rotary_cos is not None and seqlen + max(seqlen_new, rotary_q_span) > rotary_cos.shape[0]:
        raise ValueError(f"rotary_cos / rotary_sin have {rotary_cos.shape[0]} positions, but the call rotates "
                         f"positions up to {seqlen + max(seqlen_new, rotary_q_span) - 1} (cache_seqlens = {seqlen})")
