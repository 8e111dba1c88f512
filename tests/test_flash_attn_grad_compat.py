"""flash-attn's own gradient tests, driven against FlashCore: each takes flash-attn's call flow and its bound. The
output and dq, dk, dv of a FlashCore call against the float64 reference may be at most `factor` times what PyTorch's
attention in the same dtype gets wrong, plus a small atol (2x + 1e-5 as flash-attn's output and transpose tests;
5x + 1e-3 in its overflow test, whose inputs are scaled up). The gradient is taken with torch.autograd.grad of a
random upstream gradient.

    test_flash_attn_output          flash_attn_func / _kvpacked_func: MHA, GQA, MQA; causal, local window, softcap,
                                    ALiBi; head dims 64 / 80 / 96; seqlen_q != seqlen_k both ways
    test_flash_attn_qkvpacked       flash_attn_qkvpacked_func: a packed (B, S, 3, H, D) gradient
    test_flash_attn_causal          causal, bottom-right, at flash-attn's odd length pairs
    test_flash_attn_varlen_*        padded batches unpadded into flash_attn_varlen_func (and _kvpacked / _qkvpacked),
                                    the gradients padded back
    test_flash_attn_bwd_overflow    q x 5, k / v x 3, lengths not multiples of a tile (1, 2, 5, 17, 128)
    test_flash_attn_bwd_transpose   an output rearranged to (S, B, H, D) and a non-contiguous upstream gradient
    test_flash_attn_bwd_varlen_overflow   sequences of one key under 76 / 34 / 146 queries: no NaN
    test_flash_attn_deterministic   deterministic=True: every gradient bit-identical over repeated backward passes
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import flashcore
from flashcore.reference import attention_ref
from test_flash_attn_varlen_compat import HEADS, inputs, pad, padding_mask, unpad
from test_varlen import INTERPRET

pytestmark = [] if INTERPRET else [pytest.mark.gpu_extended]
DTYPES = [torch.float16] if INTERPRET else [torch.float16, torch.bfloat16]


# ---------------------------------------------------------------------------------------------------------------
# flash-attn's bound, on the output and each gradient

def reference_and_grads(reference, leaves, g, dtype):
    """(out, dq, dk, dv) of `reference(q, k, v, dtype)` on copies of `leaves` in `dtype`, upstream gradient g."""
    copies = [t.detach().to(dtype).requires_grad_() for t in leaves]
    out = reference(*copies, dtype)
    return (out, *torch.autograd.grad(out, copies, g.to(out.dtype)))


def assert_bound(ours, reference, leaves, g, factor: float = 2.0, atol: float = 1e-5) -> None:
    """`ours` = (out, dq, dk, dv) of FlashCore; each within factor * (PyTorch in the leaves' dtype's error) + atol of
    the float64 reference, finite."""
    exact = reference_and_grads(reference, leaves, g, torch.float64)
    low = reference_and_grads(reference, leaves, g, leaves[0].dtype)
    for name, mine, ref64, ref_low in zip(("out", "dq", "dk", "dv"), ours, exact, low):
        assert torch.isfinite(mine).all(), f"{name} has NaN or inf"
        err = (mine.double() - ref64).abs().max().item()
        bound = factor * (ref_low.double() - ref64).abs().max().item() + atol
        assert err <= bound, f"{name}: max error {err:.3g} > {factor} x PyTorch's + {atol} = {bound:.3g}"


def dense_reference(**options):
    """attention_ref on (B, S, H, D) tensors, computed in the given dtype."""
    return lambda q, k, v, dtype: attention_ref(q, k, v, compute_dtype=dtype, upcast_output=False, **options)[0]


def flashcore_grads(out, leaves, g):
    return (out, *torch.autograd.grad(out, leaves, g))


def leaves_of(*tensors):
    return [t.requires_grad_() for t in tensors]


# ---------------------------------------------------------------------------------------------------------------
# dense

OUTPUT_CASES = [  # (mha_type, head_dim, causal, local, softcap, alibi, (seqlen_q, seqlen_k))
    ("mha", 64, False, False, 0.0, False, (113, 203)), ("gqa", 64, True, False, 0.0, False, (257, 129)),
    ("mqa", 80, True, True, 0.0, False, (1, 147)), ("gqa", 96, False, False, 5.0, False, (108, 256)),
    ("mha", 64, True, False, 0.0, True, (113, 203)), ("gqa", 64, False, True, 0.0, True, (128, 128)),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kvpacked", [False, True], ids=["qkv", "kvpacked"])
@pytest.mark.parametrize("mha_type,head_dim,causal,local,softcap,alibi,seqlens", OUTPUT_CASES, ids=str)
def test_flash_attn_output(mha_type, head_dim, causal, local, softcap, alibi, seqlens, kvpacked, dtype, device):
    batch, (heads_q, heads_kv), (seqlen_q, seqlen_k) = 2, HEADS[mha_type], seqlens
    q, k, v = leaves_of(*inputs(batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim, dtype, device))
    window = tuple(torch.randint(0, seqlen_k, (2,)).tolist()) if local else (-1, -1)
    if local and causal:
        window = (window[0], 0)
    slopes = torch.rand(batch, heads_q, device=device, dtype=torch.float32) * 0.3 if alibi else None
    options = dict(causal=causal, window_size=window, softcap=softcap, alibi_slopes=slopes)
    if kvpacked:
        out = flashcore.flash_attn_kvpacked_func(q, torch.stack([k, v], dim=2), 0.0, None, **options)
    else:
        out = flashcore.flash_attn_func(q, k, v, 0.0, None, **options)
    g = torch.randn_like(out)
    assert_bound(flashcore_grads(out, [q, k, v], g), dense_reference(**options), [q, k, v], g)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("seqlen", [97, 257])
def test_flash_attn_qkvpacked(seqlen, causal, device):
    qkv = torch.randn(2, seqlen, 3, 4, 64, device=device, dtype=torch.float16, requires_grad=True)
    out = flashcore.flash_attn_qkvpacked_func(qkv, 0.0, None, causal)
    g = torch.randn_like(out)
    (dqkv,) = torch.autograd.grad(out, qkv, g)
    assert dqkv.shape == qkv.shape
    leaves = [qkv[:, :, i].detach() for i in range(3)]
    assert_bound((out, *dqkv.unbind(2)), dense_reference(causal=causal), leaves, g)


@pytest.mark.parametrize("seqlen_q,seqlen_k", [(1, 239), (3, 799), (127, 512), (113, 203), (256, 128), (108, 256)],
                         ids=str)
def test_flash_attn_causal(seqlen_q, seqlen_k, device):
    q, k, v = leaves_of(*inputs(2, seqlen_q, seqlen_k, 4, 4, 64, torch.float16, device))
    out = flashcore.flash_attn_func(q, k, v, 0.0, causal=True)
    g = torch.randn_like(out)
    assert_bound(flashcore_grads(out, [q, k, v], g), dense_reference(causal=True), [q, k, v], g)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("head_dim", [32, 64])
@pytest.mark.parametrize("seqlen", [1, 2, 5, 17, 128])
def test_flash_attn_bwd_overflow(seqlen, head_dim, causal, device):
    """Large scores (q x 5, k and v x 3) at lengths that leave partial tiles: no NaN in dq from keys past the end."""
    q = torch.randn(2, seqlen, 5, head_dim, device=device, dtype=torch.float16) * 5
    k, v = (torch.randn(2, seqlen, 5, head_dim, device=device, dtype=torch.float16) * 3 for _ in range(2))
    q, k, v = leaves_of(q, k, v)
    out = flashcore.flash_attn_func(q, k, v, causal=causal)
    g = torch.randn_like(out)
    assert_bound(flashcore_grads(out, [q, k, v], g), dense_reference(causal=causal), [q, k, v], g, factor=5.0,
                 atol=1e-3)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("seqlen", [97, 200])
def test_flash_attn_bwd_transpose(seqlen, causal, device):
    """The output used as (S, B, H, D) and an upstream gradient that is a strided slice: dout's strides are read."""
    batch = 3
    q, k, v = leaves_of(*inputs(batch, seqlen, seqlen, 2, 2, 64, torch.float16, device))
    out = flashcore.flash_attn_func(q, k, v, causal=causal).transpose(0, 1)
    g = torch.randn(seqlen, 2 * batch, 2, 64, device=device, dtype=torch.float16)[:, ::2]
    assert not g.is_contiguous()

    def reference(q, k, v, dtype):
        return dense_reference(causal=causal)(q, k, v, dtype).transpose(0, 1)
    assert_bound(flashcore_grads(out, [q, k, v], g), reference, [q, k, v], g)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_flash_attn_deterministic(causal, device):
    q, k, v = leaves_of(*inputs(2, 129, 211, 4, 2, 64, torch.float16, device))
    out0 = flashcore.flash_attn_func(q, k, v, causal=causal, deterministic=True)
    g = torch.randn_like(out0)
    first = torch.autograd.grad(out0, (q, k, v), g)
    for _ in range(5 if INTERPRET else 50):
        out = flashcore.flash_attn_func(q, k, v, causal=causal, deterministic=True)
        assert torch.equal(out, out0)
        assert all(torch.equal(a, b) for a, b in zip(torch.autograd.grad(out, (q, k, v), g), first))


# ---------------------------------------------------------------------------------------------------------------
# varlen: padded batches through the packed API, gradients padded back

def varlen_reference(q_mask, k_mask, **options):
    """Per-sequence attention_ref over the real tokens of padded (B, S, H, D) tensors; padded rows give 0."""
    def reference(q, k, v, dtype):
        rows = []
        for b in range(q.shape[0]):
            sq, sk = int(q_mask[b].sum()), int(k_mask[b].sum())
            slopes = options.get("alibi_slopes")
            extra = dict(options, alibi_slopes=None if slopes is None else slopes[b])
            out = attention_ref(q[b:b + 1, :sq], k[b:b + 1, :sk], v[b:b + 1, :sk], compute_dtype=dtype,
                                upcast_output=False, **extra)[0][0]
            rows.append(F.pad(out, (0, 0, 0, 0, 0, q.shape[1] - sq)))
        return torch.stack(rows)
    return reference


def padded_grads(out_unpad, packed_leaves, indices, g, batch, seqlens):
    """(out, dq, dk, dv) of a packed call, padded back to (B, S, H, D) (padding rows: 0, as the reference's)."""
    g_unpad = g.flatten(0, 1)[indices[0]]
    grads = torch.autograd.grad(out_unpad, packed_leaves, g_unpad)
    out = pad(out_unpad, indices[0], batch, seqlens[0])
    return (out, *(pad(d, idx, batch, s) for d, idx, s in zip(grads, (indices[0], indices[1], indices[1]),
                                                              (seqlens[0], seqlens[1], seqlens[1]))))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mha_type,head_dim,causal,local,softcap,alibi,seqlens", OUTPUT_CASES[:4] + OUTPUT_CASES[5:],
                         ids=str)
def test_flash_attn_varlen_output(mha_type, head_dim, causal, local, softcap, alibi, seqlens, dtype, device):
    batch, (heads_q, heads_kv), (seqlen_q, seqlen_k) = 3, HEADS[mha_type], seqlens
    q, k, v = inputs(batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim, dtype, device)
    q_mask, k_mask = padding_mask(seqlen_q, batch, "random", device), padding_mask(seqlen_k, batch, "third", device)
    window = tuple(torch.randint(0, seqlen_k, (2,)).tolist()) if local else (-1, -1)
    if local and causal:
        window = (window[0], 0)
    slopes = torch.rand(batch, heads_q, device=device, dtype=torch.float32) * 0.3 if alibi else None
    q_unpad, q_idx, cu_q, max_q = unpad(q, q_mask)
    k_unpad, k_idx, cu_k, max_k = unpad(k, k_mask)
    v_unpad = unpad(v, k_mask)[0]
    packed = leaves_of(q_unpad, k_unpad, v_unpad)
    out_unpad = flashcore.flash_attn_varlen_func(*packed, cu_q, cu_k, max_q, max_k, 0.0, None, causal, window,
                                                 softcap, slopes)
    g = torch.randn_like(q)
    ours = padded_grads(out_unpad, packed, (q_idx, k_idx), g, batch, (seqlen_q, seqlen_k))
    reference = varlen_reference(q_mask, k_mask, causal=causal, window_size=window, softcap=softcap,
                                 alibi_slopes=slopes)
    assert_bound(ours, reference, [q, k, v], g * q_mask[:, :, None, None])


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_flash_attn_varlen_qkvpacked(causal, device):
    batch, seqlen = 3, 97
    qkv = torch.randn(batch, seqlen, 3, 4, 64, device=device, dtype=torch.float16)
    mask = padding_mask(seqlen, batch, "random", device)
    qkv_unpad, idx, cu, max_len = unpad(qkv, mask)
    qkv_unpad.requires_grad_()
    out_unpad = flashcore.flash_attn_varlen_qkvpacked_func(qkv_unpad, cu, max_len, 0.0, None, causal)
    g = torch.randn(batch, seqlen, 4, 64, device=device, dtype=torch.float16) * mask[:, :, None, None]
    (dqkv,) = torch.autograd.grad(out_unpad, qkv_unpad, g.flatten(0, 1)[idx])
    ours = (pad(out_unpad, idx, batch, seqlen), *pad(dqkv, idx, batch, seqlen).unbind(2))
    leaves = [qkv[:, :, i] for i in range(3)]
    assert_bound(ours, varlen_reference(mask, mask, causal=causal), leaves, g)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_flash_attn_varlen_kvpacked(causal, device):
    batch, seqlen_q, seqlen_k = 3, 113, 203
    q, k, v = inputs(batch, seqlen_q, seqlen_k, 4, 2, 64, torch.float16, device)
    q_mask, k_mask = padding_mask(seqlen_q, batch, "random", device), padding_mask(seqlen_k, batch, "third", device)
    q_unpad, q_idx, cu_q, max_q = unpad(q, q_mask)
    kv_unpad, k_idx, cu_k, max_k = unpad(torch.stack([k, v], dim=2), k_mask)
    q_unpad.requires_grad_(), kv_unpad.requires_grad_()
    out_unpad = flashcore.flash_attn_varlen_kvpacked_func(q_unpad, kv_unpad, cu_q, cu_k, max_q, max_k, 0.0, None,
                                                          causal)
    g = torch.randn_like(q) * q_mask[:, :, None, None]
    dq, dkv = torch.autograd.grad(out_unpad, (q_unpad, kv_unpad), g.flatten(0, 1)[q_idx])
    dk, dv = pad(dkv, k_idx, batch, seqlen_k).unbind(2)
    ours = (pad(out_unpad, q_idx, batch, seqlen_q), pad(dq, q_idx, batch, seqlen_q), dk, dv)
    assert_bound(ours, varlen_reference(q_mask, k_mask, causal=causal), [q, k, v], g)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("head_dim", [32, 64])
def test_flash_attn_bwd_varlen_overflow(head_dim, causal, device):
    """Three sequences of 76, 34 and 146 queries, one key each (causal: most rows see no key): finite gradients that
    match the reference."""
    cu_q = torch.tensor([0, 76, 110, 256], device=device, dtype=torch.int32)
    cu_k = torch.tensor([0, 1, 2, 3], device=device, dtype=torch.int32)
    q = torch.randn(256, 5, head_dim, device=device, dtype=torch.float16) * 3
    k, v = (torch.randn(3, 5, head_dim, device=device, dtype=torch.float16) * 3 for _ in range(2))
    q, k, v = leaves_of(q, k, v)
    out = flashcore.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 256, 3, causal=causal)
    g = torch.randn_like(out)
    ours = flashcore_grads(out, [q, k, v], g)
    assert all(torch.isfinite(t).all() for t in ours)

    def reference(q, k, v, dtype):
        outs = [attention_ref(q[None, a:b], k[None, s:s + 1], v[None, s:s + 1], compute_dtype=dtype,
                              upcast_output=False, causal=causal)[0][0]
                for s, (a, b) in enumerate(zip(cu_q.tolist(), cu_q.tolist()[1:]))]
        return torch.cat(outs)
    assert_bound(ours, reference, [q, k, v], g, factor=5.0, atol=1e-3)
