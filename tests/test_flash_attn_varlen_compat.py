"""flash-attn's varlen API as its own tests drive it: a padded batch with random key / query padding masks is unpadded
into packed tensors, the call takes flash-attn's positional arguments, the output is padded back, and the error
against a float64 reference may be at most twice what PyTorch's attention in the same dtype makes, plus a small
atol (flash-attn's rule). Covers `flash_attn_varlen_func` (packed and, as its causal test does, through a paged
cache with a shuffled block table), `_kvpacked` and `_qkvpacked`, the signatures argument for argument."""
from __future__ import annotations

import inspect
import itertools

import pytest
import torch
import torch.nn.functional as F

import flashcore
from flashcore.reference import attention_ref
from poison import poisoned_allocations
from test_varlen import INTERPRET

pytestmark = [] if INTERPRET else [pytest.mark.gpu_extended]
DTYPES = [torch.float16] if INTERPRET else [torch.float16, torch.bfloat16]
OPTIONS = ["dropout_p", "softmax_scale", "causal", "window_size", "softcap", "alibi_slopes", "deterministic",
           "return_attn_probs"]
SIGNATURES = {
    "flash_attn_varlen_func": ["q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k",
                               *OPTIONS, "block_table"],
    "flash_attn_varlen_kvpacked_func": ["q", "kv", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k",
                                        *OPTIONS],
    "flash_attn_varlen_qkvpacked_func": ["qkv", "cu_seqlens", "max_seqlen", *OPTIONS],
}


@pytest.mark.parametrize("name", SIGNATURES)
def test_signature_is_flash_attns_in_order(name):
    params = inspect.signature(getattr(flashcore, name)).parameters
    assert [n for n, p in params.items() if p.kind == p.POSITIONAL_OR_KEYWORD] == SIGNATURES[name]
    assert params["dropout_p"].default == 0.0 and params["window_size"].default == (-1, -1)


# ---------------------------------------------------------------------------------------------------------------
# padding masks, unpad / pad (flash-attn's test flow, written for these tests)

def padding_mask(max_len: int, batch: int, mode: str, device) -> torch.Tensor:
    """(B, max_len) bool, True for real tokens at the start of each row. full: no padding; random: lengths in
    [max_len - 20, max_len]; third: lengths in [max_len / 3, max_len]. At least one token per row (flash-attn's)."""
    if mode == "full":
        lengths = torch.full((batch,), max_len)
    else:
        low = max(1, max_len - 20 if mode == "random" else max_len // 3)
        lengths = torch.randint(low, max_len + 1, (batch,))
    return (torch.arange(max_len)[None, :] < lengths[:, None]).to(device)


def unpad(x: torch.Tensor, mask: torch.Tensor):
    """(packed (total, ...), indices, cu_seqlens int32, max_seqlen) of x (B, S, ...) under mask (B, S)."""
    indices = mask.flatten().nonzero().flatten()
    lengths = mask.sum(1)
    cu = torch.tensor([0, *itertools.accumulate(lengths.tolist())], dtype=torch.int32, device=x.device)
    return x.flatten(0, 1)[indices], indices, cu, int(lengths.max())


def pad(packed: torch.Tensor, indices: torch.Tensor, batch: int, seqlen: int) -> torch.Tensor:
    out = packed.new_zeros(batch * seqlen, *packed.shape[1:])
    out[indices] = packed
    return out.view(batch, seqlen, *packed.shape[1:])


def reference(q, k, v, q_mask, k_mask, **kwargs):
    """(float64 reference, the same attention in q's dtype), each (B, Sq, Hq, D), padded rows 0: per sequence over
    its real tokens (bottom-right alignment between the real lengths, as the varlen call means it)."""
    outs = []
    for dtype in (torch.float64, q.dtype):
        out = torch.zeros(q.shape, dtype=dtype, device=q.device)
        for b in range(q.shape[0]):
            sq, sk = int(q_mask[b].sum()), int(k_mask[b].sum())
            slopes = kwargs.get("alibi_slopes")
            extra = dict(kwargs, alibi_slopes=slopes if slopes is None or slopes.dim() == 1 else slopes[b])
            out[b, :sq] = attention_ref(q[b:b + 1, :sq], k[b:b + 1, :sk], v[b:b + 1, :sk], compute_dtype=dtype,
                                        **extra)[0][0].to(dtype)
        outs.append(out)
    return outs


def assert_flash_attn_rule(out, ref64, ref_low) -> None:
    """flash-attn's bound: max |out - ref| <= 2 * max |PyTorch in the same dtype - ref| + 1e-5 (and no NaN)."""
    assert torch.isfinite(out).all()
    ours = (out.double() - ref64).abs().max().item()
    theirs = (ref_low.double() - ref64).abs().max().item()
    assert ours <= 2 * theirs + 1e-5, f"max error {ours:.3g} > 2 x PyTorch's {theirs:.3g} + 1e-5"


def inputs(batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim, dtype, device):
    q = torch.randn(batch, seqlen_q, heads_q, head_dim, device=device, dtype=dtype)
    k = torch.randn(batch, seqlen_k, heads_kv, head_dim, device=device, dtype=dtype)
    return q, k, torch.randn_like(k)


# (seqlen_q, seqlen_k) as flash-attn's varlen tests draw them, scaled for the interpreter
SEQLENS = [(1, 147), (113, 203), (108, 256), (257, 129)]
HEADS = {"mha": (4, 4), "gqa": (4, 2), "mqa": (4, 1)}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("seqlen_q,seqlen_k", SEQLENS, ids=lambda s: str(s))
@pytest.mark.parametrize("mha_type,head_dim,causal,local,softcap,alibi", [
    ("mha", 64, False, False, 0.0, False), ("gqa", 64, True, False, 0.0, False), ("mqa", 80, True, True, 0.0, False),
    ("gqa", 96, False, False, 5.0, False), ("mha", 64, True, False, 0.0, True), ("gqa", 64, False, True, 0.0, True),
], ids=lambda x: str(x))
def test_flash_attn_varlen_output(seqlen_q, seqlen_k, mha_type, head_dim, causal, local, softcap, alibi, dtype,
                                  device):
    """Random padding on both sides, positional arguments, out and lse against the rule."""
    batch, (heads_q, heads_kv) = 3, HEADS[mha_type]
    q, k, v = inputs(batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim, dtype, device)
    q_mask = padding_mask(seqlen_q, batch, "random", device)
    k_mask = padding_mask(seqlen_k, batch, "third", device)
    window = tuple(torch.randint(0, seqlen_k, (2,)).tolist()) if local else (-1, -1)
    if local and causal:
        window = (window[0], 0)
    slopes = torch.rand(batch, heads_q, device=device, dtype=torch.float32) * 0.3 if alibi else None
    q_unpad, q_idx, cu_q, max_q = unpad(q, q_mask)
    k_unpad, _, cu_k, max_k = unpad(k, k_mask)
    v_unpad = unpad(v, k_mask)[0]
    with poisoned_allocations():
        out_unpad, lse, probs = flashcore.flash_attn_varlen_func(
            q_unpad, k_unpad, v_unpad, cu_q, cu_k, max_q, max_k, 0.0, None, causal, window, softcap, slopes, False,
            True)
    assert probs is None and lse.shape == (heads_q, q_unpad.shape[0])
    out = pad(out_unpad, q_idx, batch, seqlen_q)
    ref64, ref_low = reference(q, k, v, q_mask, k_mask, causal=causal, window_size=window, softcap=softcap,
                               alibi_slopes=slopes)
    assert_flash_attn_rule(out, ref64, ref_low)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("seqlen", [1, 97, 257])
def test_flash_attn_varlen_qkvpacked(seqlen, causal, device):
    """A padded (B, S, 3, H, D) qkv, unpadded to (total, 3, H, D): one cu_seqlens for queries and keys."""
    batch, heads, head_dim = 3, 4, 64
    qkv = torch.randn(batch, seqlen, 3, heads, head_dim, device=device, dtype=torch.float16)
    mask = padding_mask(seqlen, batch, "random", device)
    qkv_unpad, idx, cu, max_len = unpad(qkv, mask)
    with poisoned_allocations():
        out_unpad = flashcore.flash_attn_varlen_qkvpacked_func(qkv_unpad, cu, max_len, 0.0, None, causal)
    out = pad(out_unpad, idx, batch, seqlen)
    ref64, ref_low = reference(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], mask, mask, causal=causal)
    assert_flash_attn_rule(out, ref64, ref_low)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_flash_attn_varlen_kvpacked(causal, device):
    batch, seqlen_q, seqlen_k = 3, 113, 203
    q, k, v = inputs(batch, seqlen_q, seqlen_k, 4, 2, 64, torch.float16, device)
    kv = torch.stack([k, v], dim=2)                      # (B, Sk, 2, Hkv, D)
    q_mask, k_mask = padding_mask(seqlen_q, batch, "random", device), padding_mask(seqlen_k, batch, "third", device)
    q_unpad, q_idx, cu_q, max_q = unpad(q, q_mask)
    kv_unpad, _, cu_k, max_k = unpad(kv, k_mask)
    with poisoned_allocations():
        out_unpad = flashcore.flash_attn_varlen_kvpacked_func(q_unpad, kv_unpad, cu_q, cu_k, max_q, max_k, 0.0, None,
                                                              causal)
    ref64, ref_low = reference(q, k, v, q_mask, k_mask, causal=causal)
    assert_flash_attn_rule(pad(out_unpad, q_idx, batch, seqlen_q), ref64, ref_low)


@pytest.mark.parametrize("block_size", [None, 16, 256], ids=["packed", "paged16", "paged256"])
@pytest.mark.parametrize("seqlen_q,seqlen_k", [(1, 239), (113, 203), (256, 128), (108, 256)], ids=str)
def test_flash_attn_varlen_causal(seqlen_q, seqlen_k, block_size, device):
    """Causal, bottom-right per sequence; with a block size, K/V as flash-attn's causal test pages them: each
    sequence's padded keys laid into blocks of a pool three times the size needed, through a shuffled table."""
    batch, heads_q, heads_kv, head_dim = 3, 4, 2, 64
    q, k, v = inputs(batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim, torch.float16, device)
    q_mask, k_mask = padding_mask(seqlen_q, batch, "random", device), padding_mask(seqlen_k, batch, "third", device)
    q_unpad, q_idx, cu_q, max_q = unpad(q, q_mask)
    k_unpad, _, cu_k, max_k = unpad(k, k_mask)
    v_unpad = unpad(v, k_mask)[0]
    extra = {}
    if block_size is not None:
        blocks_per_seq = -(-seqlen_k // block_size)
        num_blocks = blocks_per_seq * batch * 3
        table = torch.randperm(num_blocks, device=device)[:batch * blocks_per_seq].view(batch, blocks_per_seq)
        caches = []
        for t in (k, v):
            cache = torch.full((num_blocks, block_size, heads_kv, head_dim), float("nan"), dtype=t.dtype,
                               device=device)
            padded = F.pad(t, (0, 0, 0, 0, 0, blocks_per_seq * block_size - seqlen_k))
            cache[table.flatten()] = padded.reshape(batch * blocks_per_seq, block_size, heads_kv, head_dim)
            caches.append(cache)
        k_unpad, v_unpad = caches
        extra["block_table"] = table.to(torch.int32)
    with poisoned_allocations():
        out_unpad = flashcore.flash_attn_varlen_func(q_unpad, k_unpad, v_unpad, cu_q, cu_k, max_q, max_k, 0.0,
                                                     causal=True, **extra)
    ref64, ref_low = reference(q, k, v, q_mask, k_mask, causal=True)
    assert_flash_attn_rule(pad(out_unpad, q_idx, batch, seqlen_q), ref64, ref_low)
