"""The float64 reference and the tolerance rule: tests, the tuner's checks and the bench all use these.

`attention_ref` follows flash_attn_func's docstring exactly, in float64 by default:
  - q (B, Sq, Hq, D), k / v (B, Sk, Hkv, D); query head h reads kv head h // (Hq // Hkv) (GQA by index, the
    inputs are not expanded in memory by the caller's view: we index them);
  - scores = softmax_scale * q @ k^T, then softcap * tanh(scores / softcap) if softcap > 0, then the ALiBi
    bias -slope * |pos - j| if alibi_slopes are given, then the mask;
  - mask aligned bottom-right: query i sits at absolute position i + Sk - Sq and sees keys j with
    pos - left <= j <= pos + right (-1 = unbounded side); causal=True means right = 0;
  - rows that see no key: output 0, lse -inf.

`tolerance` measures what PyTorch itself loses computing the same attention in the low dtype (inputs already
rounded to that dtype, math done in it) against the float64 answer, and allows a multiple of that plus a small
absolute floor: a kernel that is as accurate as PyTorch's own low-precision path passes, a wrong one does not.
"""
from __future__ import annotations

import math

import torch


def attention_ref(q, k, v, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                  alibi_slopes=None, compute_dtype=torch.float64, upcast_output=True):
    """(out (B, Sq, Hq, D), lse (B, Hq, Sq)) computed in `compute_dtype` on q's device.

    With compute_dtype=float64 this is the ground truth. With a low dtype, every step (matmuls, softmax,
    tanh) runs in that dtype, which is what "PyTorch loses in the same dtype" means for `tolerance`.
    """
    batch, seqlen_q, heads_q, head_dim = q.shape
    seqlen_k, heads_kv = k.shape[1], k.shape[2]
    assert heads_q % max(heads_kv, 1) == 0
    group = heads_q // heads_kv
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(head_dim)
    left, right = window_size
    if causal:
        right = 0

    if seqlen_k == 0:                                                # no key: every row sees nothing
        out = torch.zeros(q.shape, dtype=compute_dtype, device=q.device)
        lse = torch.full((batch, heads_q, seqlen_q), float("-inf"), dtype=compute_dtype, device=q.device)
        return (out.double(), lse.double()) if upcast_output else (out, lse)
    qc = q.to(compute_dtype).transpose(1, 2)                        # (B, Hq, Sq, D)
    head_index = torch.arange(heads_q, device=q.device) // group    # GQA by index
    kc = k.to(compute_dtype).transpose(1, 2)[:, head_index]          # (B, Hq, Sk, D)
    vc = v.to(compute_dtype).transpose(1, 2)[:, head_index]

    scores = torch.matmul(qc, kc.transpose(-1, -2)) * softmax_scale  # (B, Hq, Sq, Sk)
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)

    pos = torch.arange(seqlen_q, device=q.device)[:, None] + (seqlen_k - seqlen_q)   # absolute row position
    cols = torch.arange(seqlen_k, device=q.device)[None, :]
    if alibi_slopes is not None:     # (Hq,) or (B, Hq): bias -slope * |pos - j|
        slopes = alibi_slopes.to(compute_dtype).reshape(-1 if alibi_slopes.dim() == 2 else 1, heads_q)
        scores = scores - slopes[:, :, None, None] * (pos - cols).abs().to(compute_dtype)
    keep = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=q.device)
    if right >= 0:
        keep &= cols <= pos + right
    if left >= 0:
        keep &= cols >= pos - left
    scores = scores.masked_fill(~keep, float("-inf"))

    lse = torch.logsumexp(scores, dim=-1)                            # -inf where a row sees nothing
    row_empty = ~keep.any(dim=-1)                                    # (Sq,)
    m = scores.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    p = torch.exp(scores - m)
    denom = p.sum(dim=-1, keepdim=True)
    p = p / torch.where(denom == 0, torch.ones_like(denom), denom)
    out = torch.matmul(p, vc)                                        # (B, Hq, Sq, D)
    out = out.masked_fill(row_empty[None, None, :, None], 0.0)
    lse = lse.masked_fill(row_empty[None, None, :], float("-inf"))
    out = out.transpose(1, 2)                                        # (B, Sq, Hq, D)
    if upcast_output:
        out, lse = out.to(torch.float64), lse.to(torch.float64)
    return out, lse


ATOL_FLOOR = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 1e-5}


def tolerance(q, k, v, factor: float = 3.0, atol_floor: float | None = None, **attn_kwargs) -> float:
    """Absolute tolerance on `out` for a kernel whose inputs and output have q's dtype.

    = factor * max |ref computed in q.dtype - ref in float64| + floor. The floor covers the final rounding of
    the output to q.dtype (half an ulp of values of size ~1) and tiny shapes where PyTorch happens to be exact.
    """
    dtype = q.dtype
    ref64, _ = attention_ref(q, k, v, **attn_kwargs)
    # CPU matmul in half precision is supported by torch (slow but fine for test shapes)
    low, _ = attention_ref(q, k, v, compute_dtype=dtype, **attn_kwargs)
    lost = (low - ref64).abs().max().item() if ref64.numel() else 0.0
    if atol_floor is None:
        atol_floor = ATOL_FLOOR[dtype]
    return factor * lost + atol_floor


def max_error(out, q, k, v, **attn_kwargs) -> tuple[float, float]:
    """(max |out - float64 reference|, tolerance): inf when out has NaN or inf."""
    ref, _ = attention_ref(q, k, v, **attn_kwargs)
    err = (out.to(torch.float64) - ref).abs().max().item() if ref.numel() else 0.0
    return (err if math.isfinite(err) else math.inf), tolerance(q, k, v, **attn_kwargs)


LSE_ATOL = {torch.float16: 1e-2, torch.bfloat16: 3e-2, torch.float32: 1e-4}


def assert_close_attention(out, q, k, v, *, lse=None, factor: float = 3.0, **attn_kwargs) -> None:
    """out (and lse) against the float64 reference, with `tolerance`'s bound, row by row (no NaN anywhere)."""
    ref, ref_lse = attention_ref(q, k, v, **attn_kwargs)
    assert out.shape == q.shape, (out.shape, q.shape)
    assert out.dtype == q.dtype, (out.dtype, q.dtype)
    assert not torch.isnan(out).any(), "output has NaN (an element left unwritten or a 0/0)"
    assert torch.isfinite(out).all(), "output has inf"
    atol = tolerance(q, k, v, factor=factor, **attn_kwargs)
    err = (out.to(torch.float64) - ref).abs()
    if err.numel():
        # worst (batch, row, head) first, so a failure points at the rows that are wrong
        per_row = err.amax(dim=-1)
        worst = per_row.max().item()
        if worst > atol:
            bad = (per_row > atol).nonzero()
            raise AssertionError(f"max error {worst:.3g} > atol {atol:.3g}; {bad.shape[0]} of {per_row.numel()} "
                                 f"(batch, row, head) rows off, first ones: {bad[:8].tolist()}")
    if lse is not None:
        batch, seqlen_q, heads_q, _ = q.shape
        assert lse.shape == (batch, heads_q, seqlen_q), (lse.shape, (batch, heads_q, seqlen_q))
        assert lse.dtype == torch.float32
        lse64 = lse.to(torch.float64)
        ref_inf = torch.isinf(ref_lse)
        assert torch.equal(torch.isneginf(lse64), ref_inf), "lse is -inf exactly on the rows that see no key"
        assert not torch.isnan(lse64).any()
        finite = ~ref_inf
        if finite.any():
            lse_err = (lse64[finite] - ref_lse[finite]).abs().max().item()
            lse_tol = LSE_ATOL[q.dtype] + 1e-5 * ref_lse[finite].abs().max().item()
            assert lse_err <= lse_tol, f"lse max error {lse_err:.3g} > {lse_tol:.3g}"
