"""FlashCore as an attention implementation of Hugging Face transformers.

    from flashcore.integrations.transformers import ATTN_IMPLEMENTATION     # "flashcore"
    model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.bfloat16, attn_implementation=ATTN_IMPLEMENTATION)
    model.set_attn_implementation(ATTN_IMPLEMENTATION)                    # or switch a loaded model

Importing this module registers `flashcore_attention_forward` in transformers' `AttentionInterface` and
transformers' flash-attention mask function in its `AttentionMaskInterface`, both under the name
ATTN_IMPLEMENTATION = "flashcore". The flash mask function hands the attention function a 2D padding mask
(B, Sk) (True = real token), or None when nothing is padded, instead of a 4D mask: FlashCore masks causality,
windows and padding itself.

The name: transformers 5 treats every implementation whose name contains "flash" as flash attention. That is what
FlashCore wants (generation keeps the padding mask that a static cache needs to tell its filled rows from its
empty ones; models that hand flash attention packed-sequence offsets hand them to this one), but it also loads
such a name's flash-attn functions on `from_pretrained` / `set_attn_implementation`, from flash-attn for
flash_attention_2/3/4 and else from the Hugging Face Hub (the `kernels` package), which fails for "flashcore".
Importing this module therefore wraps that loader (`transformers.modeling_flash_attention_utils._lazy_imports`,
a private function: the version bound in pyproject.toml is the one tested) so that "flashcore" resolves to
FlashCore's own `flash_attn_func`, `flash_attn_varlen_func` and `flash_attn_with_kvcache`; every other name
loads as before.

Supported: decoder models whose attention calls the registered attention function (Llama, Mistral, Qwen2 / Qwen3,
Gemma 2 / Gemma 3, Phi-3, ...), with MQA / GQA, sliding windows and logit softcapping; forward, `generate()`
(dynamic, static and sliding-window caches) and training (the backward of `flash_attn_func` and
`flash_attn_varlen_func`). transformers' arguments map onto FlashCore's as follows:

    query (B, Hq, Sq, D), key / value (B, Hkv, Sk, D)   -> transposed views (B, S, H, D), no copy
    scaling                                              -> softmax_scale
    is_causal (else module.is_causal)                    -> causal, bottom-right aligned (a query block that
                                                            follows Sk - Sq cached keys sees all of them)
    sliding_window (a query sees itself and the          -> window_size = (sliding_window - 1, sliding_window - 1)
      sliding_window - 1 keys before it)                    (the right side is 0 when causal); none when every
                                                            key is inside the window anyway
    softcap (None = off)                                 -> softcap (0.0 = off)
    dropout                                              -> dropout_p (FlashCore raises for > 0)

and each call takes one of these paths:
    - attention_mask (B, Sk_mask) with padding: the varlen path. Real tokens are gathered into packed
      (total, H, D) tensors with cu_seqlens from the mask, `flash_attn_varlen_func` attends (causal per sequence,
      bottom-right, so left-padded decoding works), and the output is scattered back into zeros (B, Sq, Hq, D).
      The query tokens are the last Sq columns of the mask; a static cache's keys past the mask are not read.
    - cu_seq_lens_q / cu_seq_lens_k / max_length_q / max_length_k kwargs (padding-free batches, e.g.
      DataCollatorWithFlattening), or B == 1 with position_ids that restart (packed sequences): varlen on the
      flattened tokens.
    - no mask, fewer queries than keys (a decode step against the KV cache: Sq new tokens after Sk - Sq cached
      ones), no gradient needed and Sq * Hq / Hkv <= 128: `flash_attn_with_kvcache` over the keys as a full cache
      (its split-KV decode kernel).
    - otherwise: `flash_attn_func` (dense; prefill, training, chunked prefill with causal bottom-right).

Dtypes: FlashCore takes float16, bfloat16 and float32. float32 queries under autocast are cast to the autocast dtype
(as transformers' flash integration does); other dtypes raise a TypeError.

Continuous batching (`generate_batch`, transformers' PagedAttentionCache) takes the varlen path: the cache gathers
each sequence's keys and hands packed offsets. Where it hands a block table instead (its decode fast path:
`block_table`, `k_cache`, `v_cache`), `flash_attn_with_kvcache` appends the new tokens into the paged cache and
attends through the table. transformers before 5.23 runs continuous batching under the name "paged|" +
ATTN_IMPLEMENTATION, through its own paged flash-attention function (transformers.integrations.flash_paged), which
loads the flash functions of that name: it is registered too, and the wrapped loader gives it FlashCore's, behind
two adapters for the padding of its CUDA-graphed batches (rows past the last sequence; decode rows of no keys),
which FlashCore's value checks would refuse.

Not supported: dropout, attention sinks (`s_aux`), returning attention weights (None is returned, as flash-attn
implementations do), 4D attention masks (custom masks).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers import modeling_flash_attention_utils as _fa_utils
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

import flashcore

ATTN_IMPLEMENTATION = "flashcore"
PAGED_IMPLEMENTATION = f"paged|{ATTN_IMPLEMENTATION}"       # continuous batching's name before transformers 5.23

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_DECODE_MAX_ROWS = 128      # flash_attn_with_kvcache's limit on Sq * Hq / Hkv (one tile of query rows per kv head)


def flashcore_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                attention_mask: torch.Tensor | None, dropout: float = 0.0,
                                scaling: float | None = None, sliding_window: int | None = None,
                                softcap: float | None = None, is_causal: bool | None = None,
                                s_aux: torch.Tensor | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature over FlashCore's kernels (the mapping: module docstring).

    Args:
        module: the calling attention layer (its `is_causal` is the default of is_causal).
        query: (B, Hq, Sq, D); key, value: (B, Hkv, Sk, D), Hq a multiple of Hkv.
        attention_mask: None, or a 2D (B, Sk_mask) padding mask (True / 1 = real token, Sk_mask <= Sk).
        kwargs: cu_seq_lens_q, cu_seq_lens_k ((N + 1,) offsets), max_length_q, max_length_k for padding-free
            batches of N packed sequences (B == 1); position_ids (B, Sq); the rest is ignored.

    Returns:
        (out, None): out (B, Sq, Hq, D) in the kernel's dtype; None for the attention weights.
    """
    if s_aux is not None:
        raise NotImplementedError("FlashCore attention has no attention sinks (s_aux); use attn_implementation='sdpa'")
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(f"FlashCore attention takes a 2D padding mask (B, Sk) or None, got a mask of shape "
                         f"{tuple(attention_mask.shape)}: is the model's mask function the one registered with it?")
    q, k, v = _kernel_dtype(*(x.transpose(1, 2) for x in (query, key, value)))
    batch, seqlen_q, seqlen_k = q.shape[0], q.shape[1], k.shape[1]
    causal = module.is_causal if is_causal is None else is_causal
    options = dict(softmax_scale=scaling, causal=causal, window_size=_window(sliding_window, seqlen_k),
                   softcap=0.0 if softcap is None else softcap)

    if kwargs.get("block_table") is not None:
        return _paged_decode(q, k, v, kwargs, dict(options, window_size=_window(sliding_window,
                                                                                int(kwargs["max_length_k"])))), None
    if attention_mask is not None:
        return _padded_attention(q, k, v, attention_mask, dropout, options), None
    packed = _packed_offsets(kwargs, batch, seqlen_q, seqlen_k)
    if packed is not None:
        cu_q, cu_k, max_q, max_k = packed
        out = flashcore.flash_attn_varlen_func(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu_q, cu_k,
                                               max_q, max_k, dropout, **options)
        return out.view(batch, seqlen_q, *out.shape[1:]), None
    needs_grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
    group = q.shape[2] // k.shape[2]
    if seqlen_q < seqlen_k and not needs_grad and dropout == 0.0 and seqlen_q * group <= _DECODE_MAX_ROWS:
        return flashcore.flash_attn_with_kvcache(q, k, v, **options), None
    return flashcore.flash_attn_func(q, k, v, dropout, **options), None


def _kernel_dtype(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """q, k, v in a dtype the kernels take: float32 under autocast goes to the autocast dtype (the dtype SDPA would
    run in there), anything else but float16 / bfloat16 / float32 is refused."""
    device_type = q.device.type
    if q.dtype == torch.float32 and torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        return q.to(dtype), k.to(dtype), v.to(dtype)
    if q.dtype not in _KERNEL_DTYPES:
        raise TypeError(f"FlashCore attention runs in float16, bfloat16 or float32; this model's attention got "
                        f"{q.dtype}: load the model with dtype=torch.bfloat16 (or float16 / float32)")
    return q, k, v


def _window(sliding_window: int | None, seqlen_k: int) -> tuple[int, int]:
    """flash-attn's window_size for transformers' sliding_window. transformers counts the query's own key in the
    window (query p sees keys p - sliding_window < j <= p), flash-attn counts the keys beside it: left =
    sliding_window - 1. With Sk <= sliding_window every key is inside every query's window: no window, so the call
    runs the kernel without the window's masking."""
    if sliding_window is None or seqlen_k <= sliding_window:
        return (-1, -1)
    return (sliding_window - 1, sliding_window - 1)


def _cu_seqlens(mask: torch.Tensor) -> torch.Tensor:
    """(B + 1,) int32 offsets of each row's real tokens packed one after another; mask (B, S)."""
    return F.pad(mask.sum(dim=1, dtype=torch.int32).cumsum(0, dtype=torch.int32), (1, 0))


def _padded_attention(q, k, v, mask, dropout, options) -> torch.Tensor:
    """The varlen path: q (B, Sq, Hq, D), k / v (B, Sk, Hkv, D), mask (B, Sk_mask) -> (B, Sq, Hq, D), zeros at
    padded query rows."""
    batch, seqlen_q = q.shape[:2]
    seqlen_k = mask.shape[1]
    # a static cache returns all its rows; only the first Sk_mask hold tokens (the mask covers past + new tokens)
    k, v = k[:, :seqlen_k], v[:, :seqlen_k]
    rows_k = mask.flatten().nonzero().flatten()
    if seqlen_q == seqlen_k:
        mask_q, rows_q = mask, rows_k
    else:   # the queries are the newest tokens: the mask's last Sq columns
        mask_q = mask[:, -seqlen_q:]
        rows_q = mask_q.flatten().nonzero().flatten()
    cu_k = _cu_seqlens(mask)
    cu_q = cu_k if mask_q is mask else _cu_seqlens(mask_q)
    # max_seqlen only sizes the kernels' buckets (any bound works): the padded lengths cost no device sync
    out = flashcore.flash_attn_varlen_func(q.flatten(0, 1)[rows_q], k.flatten(0, 1)[rows_k], v.flatten(0, 1)[rows_k],
                                           cu_q, cu_k, seqlen_q, seqlen_k, dropout, **options)
    padded = out.new_zeros(batch * seqlen_q, *out.shape[1:])
    padded[rows_q] = out
    return padded.view(batch, seqlen_q, *out.shape[1:])


def _paged_decode(q, k, v, kwargs: dict, options: dict) -> torch.Tensor:
    """Continuous batching's decode fast path: q, k, v (B, N, H, D) hold one new token of each of N sequences
    (packed along the sequence axis); the kwargs carry the layer's paged cache k_cache / v_cache (num_pages,
    page_size, Hkv, D), its block_table (N, max_pages) and cu_seq_lens_k ((N + 1,) offsets of each sequence's keys,
    the new one included). `flash_attn_with_kvcache` appends each token at its sequence's length and attends."""
    batch, tokens = q.shape[:2]
    q, k, v = (x.reshape(-1, 1, *x.shape[2:]) for x in (q, k, v))
    cu_k = kwargs["cu_seq_lens_k"]
    cached = (cu_k[1:q.shape[0] + 1] - cu_k[:q.shape[0]] - 1).to(torch.int32)   # keys before the new token
    out = flashcore.flash_attn_with_kvcache(q, kwargs["k_cache"], kwargs["v_cache"], k, v, cache_seqlens=cached,
                                            block_table=kwargs["block_table"].to(torch.int32), **options)
    return out.view(batch, tokens, *out.shape[2:])


def _packed_offsets(kwargs: dict, batch: int, seqlen_q: int, seqlen_k: int):
    """(cu_q, cu_k, max_q, max_k) when the batch row holds several packed sequences, else None.

    Explicit offsets (cu_seq_lens_q / _k, max_length_q / _k) come from padding-free collators. Without them, as in
    transformers' flash integration, B == 1 with position_ids that do not count up by one from start to end marks
    packed sequences, a new one wherever the position does not follow its predecessor (one device sync a layer,
    for B == 1 prefill and training calls only)."""
    names = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
    if all(kwargs.get(name) is not None for name in names):
        cu_q, cu_k, max_q, max_k = (kwargs[name] for name in names)
        return cu_q.to(torch.int32), cu_k.to(torch.int32), int(max_q), int(max_k)
    position_ids = kwargs.get("position_ids")
    if position_ids is None or batch != 1 or seqlen_q == 1 or seqlen_q != seqlen_k:
        return None
    positions = position_ids.reshape(-1)
    starts = (positions[1:] != positions[:-1] + 1).nonzero().flatten() + 1
    if starts.numel() == 0:
        return None
    ends = torch.tensor([0, seqlen_q], dtype=torch.int32, device=positions.device)
    cu = torch.cat([ends[:1], starts.to(torch.int32), ends[1:]])
    return cu, cu, seqlen_q, seqlen_k


def _varlen_of_padded_batches(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *args, **kwargs):
    """flash_attn_varlen_func as transformers < 5.23 calls it from continuous batching. With CUDA graphs it pads q,
    and the keys it gathers, past the last sequence's rows, which FlashCore's value checks refuse (cu_seqlens must
    end at q's and k's rows). The padding becomes one more sequence, of the rows and keys past the last, on the
    device (no sync, graph-safe): it attends its own keys (reads of the cache's trash) and is discarded; when
    nothing is padded it is empty."""
    total_q, total_k = q.shape[0], k.shape[0]
    cu_q = torch.cat([cu_seqlens_q, cu_seqlens_q.new_full((1,), total_q)])
    cu_k = torch.cat([cu_seqlens_k, cu_seqlens_k.new_full((1,), total_k)])
    return flashcore.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(max_seqlen_q, total_q), max(max_seqlen_k, total_k),
                                            *args, **kwargs)


def _with_kvcache_of_padded_batches(q, k_cache, v_cache, k=None, v=None, cache_seqlens=None, block_table=None,
                                    **kwargs):
    """flash_attn_with_kvcache as transformers < 5.23 calls it from continuous batching. A CUDA-graphed decode batch
    is padded to a fixed size with rows of no keys: cache_seqlens -1 (one less than their 0 keys) and block-table
    rows of -1, which FlashCore refuses as bad input. Such rows get length 0 and the cache's last block (transformers'
    write trash, past the blocks it hands out) in place of every -1 entry, on the device (no sync, graph-safe); the
    real rows, whose used entries are all >= 0, are untouched, and the padded rows' outputs are discarded."""
    trash = k_cache.shape[0] - 1
    return flashcore.flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=cache_seqlens.clamp(min=0),
                                             block_table=block_table.masked_fill(block_table < 0, trash), **kwargs)


def _route_flash_loader() -> None:
    """Make transformers' flash-attention loader resolve ATTN_IMPLEMENTATION to FlashCore's functions (the module
    docstring says why); a transformers without that loader has nothing to wrap."""
    load = getattr(_fa_utils, "_lazy_imports", None)
    if load is None or getattr(load, "flashcore_route", False):     # (a reload of this module wraps it once)
        return

    @functools.wraps(load)
    def lazy_imports(implementation, *args, **kwargs):
        if implementation not in (ATTN_IMPLEMENTATION, PAGED_IMPLEMENTATION):
            return load(implementation, *args, **kwargs)
        if implementation == PAGED_IMPLEMENTATION:
            varlen, with_kvcache = _varlen_of_padded_batches, _with_kvcache_of_padded_batches
        else:
            varlen, with_kvcache = flashcore.flash_attn_varlen_func, flashcore.flash_attn_with_kvcache
        return flashcore.flash_attn_func, varlen, with_kvcache, _fa_utils._pad_input, _fa_utils._unpad_input

    lazy_imports.flashcore_route = True
    _fa_utils._lazy_imports = lazy_imports


_route_flash_loader()
AttentionInterface.register(ATTN_IMPLEMENTATION, flashcore_attention_forward)
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, ALL_MASK_ATTENTION_FUNCTIONS["flash_attention_2"])
try:                            # transformers < 5.23: continuous batching switches a model to "paged|" + its name
    from transformers.integrations.flash_paged import paged_attention_forward as _paged_attention_forward
except ImportError:
    _paged_attention_forward = None
if _paged_attention_forward is not None:
    AttentionInterface.register(PAGED_IMPLEMENTATION, _paged_attention_forward)
