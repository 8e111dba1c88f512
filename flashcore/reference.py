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

`kvcache_ref` is flash_attn_with_kvcache's reference (the contract in flashcore/kvcache.py's docstring): the
append (with rotary) done on copies of the caches, then `attention_ref` per sequence over the keys it attends;
`assert_close_kvcache` checks a call's output, lse and both caches against it with the same tolerance rule.
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
    ref64, _ = attention_ref(q, k, v, **attn_kwargs)
    # CPU matmul in half precision is supported by torch (slow but fine for test shapes)
    low, _ = attention_ref(q, k, v, compute_dtype=q.dtype, **attn_kwargs)
    return _bound(ref64, low, q.dtype, factor, atol_floor)


def _bound(ref64, low, dtype, factor: float, atol_floor: float | None) -> float:
    """factor * max |low - ref64| + atol_floor (ATOL_FLOOR[dtype] unless given): the rule both tolerances follow."""
    lost = (low - ref64).abs().max().item() if ref64.numel() else 0.0
    return factor * lost + (ATOL_FLOOR[dtype] if atol_floor is None else atol_floor)


def max_error(out, q, k, v, **attn_kwargs) -> tuple[float, float]:
    """(max |out - float64 reference|, tolerance): inf when out has NaN or inf."""
    ref, _ = attention_ref(q, k, v, **attn_kwargs)
    err = (out.to(torch.float64) - ref).abs().max().item() if ref.numel() else 0.0
    return (err if math.isfinite(err) else math.inf), tolerance(q, k, v, **attn_kwargs)


def _reference_grads(q, k, v, dout, compute_dtype, reference, **attn_kwargs) -> list[torch.Tensor]:
    """(dq, dk, dv) of `reference` autograd'ed in `compute_dtype`, as float64."""
    leaves = [t.detach().to(compute_dtype).requires_grad_() for t in (q, k, v)]
    with torch.enable_grad():
        out, _ = reference(*leaves, compute_dtype=compute_dtype, upcast_output=False, **attn_kwargs)
        out.backward(dout.to(out.dtype))
    return [t.grad.double() for t in leaves]


def grad_errors(grads, q, k, v, dout, factor: float = 4.0, reference=None, **attn_kwargs):
    """[(name, max error, tolerance)] of dq, dk, dv (`grads`, in the inputs' shapes) against float64 autograd of
    `reference` (attention_ref, or varlen_ref with its cu_seqlens in attn_kwargs) for upstream gradient `dout`.
    The tolerance is `factor` times what the same reference loses autograd'ed in q's dtype, plus ATOL_FLOOR scaled
    by the gradient's size; an error is inf where the gradient has NaN or inf."""
    reference = reference or attention_ref
    exact = _reference_grads(q, k, v, dout, torch.float64, reference, **attn_kwargs)
    low = _reference_grads(q, k, v, dout, q.dtype, reference, **attn_kwargs)
    out = []
    for name, grad, ref, ref_low in zip(("dq", "dk", "dv"), grads, exact, low):
        if not ref.numel():
            out.append((name, 0.0, 0.0))
            continue
        err = (grad.double() - ref).abs().max().item()
        tol = factor * (ref_low - ref).abs().max().item() + ATOL_FLOOR[q.dtype] * max(ref.abs().max().item(), 1.0)
        out.append((name, err if math.isfinite(err) else math.inf, tol))
    return out


LSE_ATOL = {torch.float16: 1e-2, torch.bfloat16: 3e-2, torch.float32: 1e-4}


def assert_close_attention(out, q, k, v, *, lse=None, factor: float = 3.0, **attn_kwargs) -> None:
    """out (and lse) against the float64 reference, with `tolerance`'s bound, row by row (no NaN anywhere)."""
    ref, ref_lse = attention_ref(q, k, v, **attn_kwargs)
    assert out.shape == q.shape, (out.shape, q.shape)
    assert out.dtype == q.dtype, (out.dtype, q.dtype)
    _assert_rows_close(out, ref, tolerance(q, k, v, factor=factor, **attn_kwargs))
    if lse is not None:
        _assert_lse_close(lse, ref_lse, q)


def _assert_rows_close(out, ref, atol: float) -> None:
    """out (B, Sq, H, D) within atol of the float64 ref, no NaN or inf; a failure names the worst rows."""
    assert not torch.isnan(out).any(), "output has NaN (an element left unwritten or a 0/0)"
    assert torch.isfinite(out).all(), "output has inf"
    err = (out.to(torch.float64) - ref).abs()
    if err.numel():
        # worst (batch, row, head) first, so a failure points at the rows that are wrong
        per_row = err.amax(dim=-1)
        worst = per_row.max().item()
        if worst > atol:
            bad = (per_row > atol).nonzero()
            raise AssertionError(f"max error {worst:.3g} > atol {atol:.3g}; {bad.shape[0]} of {per_row.numel()} "
                                 f"(batch, row, head) rows off, first ones: {bad[:8].tolist()}")


def _assert_lse_close(lse, ref_lse, q) -> None:
    """lse (B, Hq, Sq) float32: -inf exactly where the reference's is, elsewhere within LSE_ATOL of it."""
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


# ---------------------------------------------------------------------------------------------------------------
# KV cache (flash_attn_with_kvcache)

def _per_sequence(value, batch: int, default: int, device) -> torch.Tensor:
    """An int, a (B,) tensor or None (-> default) as a (B,) int64 tensor."""
    if value is None:
        value = default
    if isinstance(value, torch.Tensor):
        return value.to(device=device, dtype=torch.int64).reshape(batch)
    return torch.full((batch,), int(value), dtype=torch.int64, device=device)


def kvcache_capacity(k_cache, block_table=None) -> int:
    """Tokens one sequence can hold: S_cache (contiguous) or max_blocks * block_size (paged)."""
    return block_table.shape[1] * k_cache.shape[1] if block_table is not None else k_cache.shape[1]


def kvcache_slots(k_cache, positions, cache_batch_idx=None, block_table=None):
    """(rows, offsets), each shaped like positions (B, S): where token positions[b, s] of sequence b lives,
    k_cache[rows, offsets]. Positions must be < capacity; paged block-table entries they use must be valid."""
    batch = positions.shape[0]
    seq = torch.arange(batch, device=positions.device)[:, None].expand_as(positions)
    if block_table is not None:
        block_size = k_cache.shape[1]
        rows = block_table.to(torch.int64)[seq, positions // block_size]
        return rows, positions % block_size
    rows = cache_batch_idx.to(torch.int64)[seq] if cache_batch_idx is not None else seq
    return rows, positions


def gather_kvcache(cache, block_table=None, cache_batch_idx=None, batch: int | None = None):
    """The cache as the sequences see it: (B, capacity, Hkv, D), a contiguous copy in cache's dtype.

    cache: paged (num_blocks, block_size, Hkv, D) with block_table (B, max_blocks): position p of sequence b
    is cache[block_table[b, p // block_size], p % block_size]. Block-table entries outside [0, num_blocks)
    (allowed for blocks a call does not use) give NaN blocks. Contiguous (B_cache, S_cache, Hkv, D): sequence b
    is row cache_batch_idx[b] if given, else row b (of the first `batch` rows; default all of them).
    """
    if block_table is not None:
        num_blocks, block_size = cache.shape[:2]
        table = block_table.to(torch.int64)
        valid = (table >= 0) & (table < num_blocks)                                     # (B, max_blocks)
        blocks = cache[table.clamp(0, max(num_blocks - 1, 0))]                         # (B, max_blocks, bs, H, D)
        blocks = blocks.masked_fill(~valid[:, :, None, None, None], float("nan"))
        return blocks.reshape(table.shape[0], table.shape[1] * block_size, *cache.shape[2:])
    if cache_batch_idx is not None:
        return cache[cache_batch_idx.to(torch.int64)].contiguous()
    return cache[: cache.shape[0] if batch is None else batch].contiguous()


def _split_pairs(x, rotary_dim: int, interleaved: bool):
    """(x1, x2), the two halves of x's rotated pairs: (x[2i], x[2i+1]) if interleaved, else (x[i], x[i + rd/2])."""
    if interleaved:
        return x[..., 0:rotary_dim:2], x[..., 1:rotary_dim:2]
    return x[..., : rotary_dim // 2], x[..., rotary_dim // 2: rotary_dim]


def _join_pairs(r1, r2, interleaved: bool):
    return torch.stack((r1, r2), dim=-1).flatten(-2) if interleaved else torch.cat((r1, r2), dim=-1)


def apply_rotary(x, cos, sin, positions, interleaved: bool, compute_dtype=torch.float64):
    """x (B, S, H, D) rotated at token positions (B, S), returned in compute_dtype (all math in it).

    cos / sin (seqlen_ro, rotary_dim / 2); only the first rotary_dim features rotate, the rest are copied.
    interleaved: pairs (x[2i], x[2i+1]) (GPT-J); else (x[i], x[i + rotary_dim / 2]) (GPT-NeoX). Each pair
    (x1, x2) with angle i becomes (x1 cos - x2 sin, x1 sin + x2 cos).
    """
    rotary_dim = 2 * cos.shape[1]
    xc = x.to(compute_dtype)
    c = cos.to(compute_dtype)[positions][:, :, None, :]                               # (B, S, 1, rotary_dim / 2)
    s = sin.to(compute_dtype)[positions][:, :, None, :]
    x1, x2 = _split_pairs(xc, rotary_dim, interleaved)
    rotated = _join_pairs(x1 * c - x2 * s, x1 * s + x2 * c, interleaved)
    return torch.cat((rotated, xc[..., rotary_dim:]), dim=-1)


def _rotary_magnitude(x, cos, sin, positions, interleaved: bool):
    """float64 (B, S, H, rotary_dim): (|x1| + |x2|) * max(|cos|, |sin|) per rotated feature, a bound on the terms
    |x1 cos| + |x2 sin| (or |x1 sin| + |x2 cos|) whose fp32 rounding the rotated value carries."""
    rotary_dim = 2 * cos.shape[1]
    x1, x2 = _split_pairs(x.double().abs(), rotary_dim, interleaved)
    m = torch.maximum(cos.double().abs(), sin.double().abs())[positions][:, :, None, :]
    pair = (x1 + x2) * m
    return _join_pairs(pair, pair, interleaved)


def kvcache_append_ref(k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None, cache_seqlens=None,
                       cache_batch_idx=None, block_table=None, rotary_interleaved=True, compute_dtype=torch.float64):
    """(k_cache_after, v_cache_after): copies of the caches with k / v (B, S_new, Hkv, D) written at positions
    cache_seqlens[b] + t, k rotated at those positions (math in compute_dtype, rounded once to the cache dtype)."""
    k_after, v_after = k_cache.clone(), v_cache.clone()
    if k is None:
        return k_after, v_after
    batch, seqlen_new = k.shape[:2]
    seqlens = _per_sequence(cache_seqlens, batch, 0, k.device)
    positions = seqlens[:, None] + torch.arange(seqlen_new, device=k.device)
    new_k = k
    if rotary_cos is not None:
        new_k = apply_rotary(k, rotary_cos, rotary_sin, positions, rotary_interleaved, compute_dtype)
    rows, offsets = kvcache_slots(k_cache, positions, cache_batch_idx, block_table)
    k_after[rows, offsets] = new_k.to(k_cache.dtype)
    v_after[rows, offsets] = v.to(v_cache.dtype)
    return k_after, v_after


def kvcache_ref(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None, cache_seqlens=None,
                cache_batch_idx=None, cache_leftpad=None, block_table=None, softmax_scale=None, causal=False,
                window_size=(-1, -1), softcap=0.0, rotary_interleaved=True, alibi_slopes=None,
                compute_dtype=torch.float64):
    """flash_attn_with_kvcache's reference: (out (B, Sq, Hq, D) float64, lse (B, Hq, Sq) float64,
    k_cache_after, v_cache_after), the caches after the append (copies, in the caches' dtype and layout).

    Arguments as flash_attn_with_kvcache's (flashcore/kvcache.py); none is modified. The new k is rotated in
    float64 and rounded once to the cache dtype (what a kernel rotating in fp32 stores, up to its own
    rounding: `assert_kvcache_append` allows for that); q is rotated in float64. Sequence b attends the keys at
    positions leftpad[b] <= j < cache_seqlens[b] + S_new of the cache after the append, through attention_ref
    (the window and ALiBi depend on differences of positions only, so slicing off the left pad changes nothing).

    With compute_dtype a low dtype every step (rotary, attention) runs in it, as PyTorch would: what
    `kvcache_tolerance` measures the loss of.
    """
    batch, seqlen_q = q.shape[:2]
    seqlen_new = 0 if k is None else k.shape[1]
    capacity = kvcache_capacity(k_cache, block_table)
    seqlens = _per_sequence(cache_seqlens, batch, capacity, q.device)
    leftpad = _per_sequence(cache_leftpad, batch, 0, q.device)
    q_c = q.to(compute_dtype)
    if rotary_cos is not None:
        q_pos = seqlens[:, None] + torch.arange(seqlen_q, device=q.device)
        if not causal and tuple(window_size) == (-1, -1):
            q_pos = seqlens[:, None].expand(batch, seqlen_q)      # every row at the first new position
        q_c = apply_rotary(q, rotary_cos, rotary_sin, q_pos, rotary_interleaved, compute_dtype)
    k_after, v_after = kvcache_append_ref(k_cache, v_cache, k, v, rotary_cos, rotary_sin, seqlens, cache_batch_idx,
                                          block_table, rotary_interleaved, compute_dtype)

    keys = gather_kvcache(k_after, block_table, cache_batch_idx, batch)
    values = gather_kvcache(v_after, block_table, cache_batch_idx, batch)
    outs, lses = [], []
    for b in range(batch):
        start, end = int(leftpad[b]), int(seqlens[b]) + seqlen_new
        slopes = alibi_slopes[b: b + 1] if alibi_slopes is not None and alibi_slopes.dim() == 2 else alibi_slopes
        out_b, lse_b = attention_ref(q_c[b: b + 1], keys[b: b + 1, start:end], values[b: b + 1, start:end],
                                     softmax_scale=softmax_scale, causal=causal, window_size=window_size,
                                     softcap=softcap, alibi_slopes=slopes, compute_dtype=compute_dtype)
        outs.append(out_b)
        lses.append(lse_b)
    return torch.cat(outs), torch.cat(lses), k_after, v_after


def kvcache_tolerance(q, k_cache, v_cache, factor: float = 3.0, atol_floor: float | None = None,
                      **kvcache_kwargs) -> float:
    """`tolerance` for flash_attn_with_kvcache's out: factor * max |kvcache_ref in q.dtype - in float64| + floor."""
    ref64 = kvcache_ref(q, k_cache, v_cache, **kvcache_kwargs)[0]
    low = kvcache_ref(q, k_cache, v_cache, compute_dtype=q.dtype, **kvcache_kwargs)[0]
    return _bound(ref64, low, q.dtype, factor, atol_floor)


def bits(t: torch.Tensor) -> torch.Tensor:
    """t's bit patterns (NaN equals NaN of the same payload): what "bit-identical" compares."""
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def assert_kvcache_append(k_cache_now, v_cache_now, k_cache, v_cache, k=None, v=None, rotary_cos=None,
                          rotary_sin=None, cache_seqlens=None, cache_batch_idx=None, block_table=None,
                          rotary_interleaved=True, **_attention_kwargs) -> None:
    """The caches after a call (k_cache_now, v_cache_now) against the caches before it (k_cache, v_cache).

    Every slot the append does not own is bit-identical to before (NaN poison included). The new slots hold v
    exactly, k's unrotated features exactly, and k's rotated features within the rounding of a rotation done in
    fp32 and stored in the cache dtype: |stored - float64 rotation| <= eps * |value| + 4 * eps_fp32 * (|x1 cos| +
    |x2 sin|) + the dtype's smallest subnormal (half an ulp for the store, two fp32 roundings, FMA or not).
    """
    written = torch.zeros(k_cache.shape[:2], dtype=torch.bool, device=k_cache.device)
    if k is not None:                       # the slots of the new tokens, (B, S_new) each
        positions = _per_sequence(cache_seqlens, k.shape[0], 0, k.device)[:, None] + torch.arange(k.shape[1],
                                                                                                   device=k.device)
        rows, offsets = kvcache_slots(k_cache, positions, cache_batch_idx, block_table)
        written[rows, offsets] = True
    for name, now, before in (("k_cache", k_cache_now, k_cache), ("v_cache", v_cache_now, v_cache)):
        assert now.shape == before.shape and now.dtype == before.dtype, (name, now.shape, now.dtype)
        changed = (bits(now) != bits(before)).flatten(2).any(dim=-1) & ~written
        assert not changed.any(), (f"{name}: {int(changed.sum())} slots outside the appended ones changed, first "
                                   f"(block or row, offset): {changed.nonzero()[:8].tolist()}")
    if k is None:
        return
    got_k, got_v = k_cache_now[rows, offsets], v_cache_now[rows, offsets]              # (B, S_new, Hkv, D)
    assert torch.equal(bits(got_v), bits(v.to(v_cache.dtype))), "v_cache: new slots differ from v"
    rotary_dim = 0 if rotary_cos is None else 2 * rotary_cos.shape[1]
    assert torch.equal(bits(got_k[..., rotary_dim:]), bits(k[..., rotary_dim:].to(k_cache.dtype))), \
        "k_cache: new slots' unrotated features differ from k"
    if rotary_dim:
        exact = apply_rotary(k, rotary_cos, rotary_sin, positions, rotary_interleaved)[..., :rotary_dim]
        magnitude = _rotary_magnitude(k, rotary_cos, rotary_sin, positions, rotary_interleaved)
        finfo = torch.finfo(k_cache.dtype)
        bound = (finfo.eps * exact.abs() + 4 * torch.finfo(torch.float32).eps * magnitude
                 + finfo.smallest_normal * finfo.eps)
        err = (got_k[..., :rotary_dim].double() - exact).abs()
        assert not torch.isnan(err).any(), "k_cache: a new slot's rotated feature is NaN"
        assert (err <= bound).all(), (f"k_cache: rotated new k off by up to {(err / bound).max().item():.3g}x the "
                                      f"rounding bound")


def assert_close_kvcache(out, q, k_cache, v_cache, k_cache_now, v_cache_now, *, lse=None, factor: float = 3.0,
                         **kvcache_kwargs) -> None:
    """A flash_attn_with_kvcache call against kvcache_ref: out (and lse) row by row within kvcache_tolerance,
    and the caches after the call (k_cache_now, v_cache_now) against the caches before it (k_cache, v_cache,
    copies taken before the call) by `assert_kvcache_append`. kvcache_kwargs: the call's other arguments."""
    ref, ref_lse, _, _ = kvcache_ref(q, k_cache, v_cache, **kvcache_kwargs)
    assert out.shape == q.shape, (out.shape, q.shape)
    assert out.dtype == q.dtype, (out.dtype, q.dtype)
    _assert_rows_close(out, ref, kvcache_tolerance(q, k_cache, v_cache, factor=factor, **kvcache_kwargs))
    if lse is not None:
        _assert_lse_close(lse, ref_lse, q)
    assert_kvcache_append(k_cache_now, v_cache_now, k_cache, v_cache, **kvcache_kwargs)


# ---------------------------------------------------------------------------------------------------------------
# Varlen (flash_attn_varlen_func)

def varlen_sequences(q, k, v, cu_seqlens_q, cu_seqlens_k, block_table=None):
    """Each sequence of a packed call as a batch-1 dense call: (b, rows, q_b (1, Sq, Hq, D), k_b, v_b (1, Sk, Hkv,
    D)); rows: q's packed rows of the sequence. Paged k / v are gathered through the block table."""
    cu_q, cu_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    if block_table is not None:
        k, v = gather_kvcache(k, block_table), gather_kvcache(v, block_table)       # (B, capacity, Hkv, D)
    for b in range(len(cu_q) - 1):
        rows = slice(cu_q[b], cu_q[b + 1])
        if block_table is not None:
            keys = cu_k[b + 1] - cu_k[b]
            k_b, v_b = k[b: b + 1, :keys], v[b: b + 1, :keys]
        else:
            k_b, v_b = k[None, cu_k[b]: cu_k[b + 1]], v[None, cu_k[b]: cu_k[b + 1]]
        yield b, rows, q[None, rows], k_b, v_b


def varlen_ref(q, k, v, cu_seqlens_q, cu_seqlens_k, block_table=None, alibi_slopes=None, **attn_kwargs):
    """(out (total_q, Hq, D), lse (Hq, total_q)) in float64: attention_ref per sequence."""
    out = torch.zeros(q.shape, dtype=torch.float64, device=q.device)
    lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=torch.float64, device=q.device)
    for b, rows, q_b, k_b, v_b in varlen_sequences(q, k, v, cu_seqlens_q, cu_seqlens_k, block_table):
        slopes = alibi_slopes if alibi_slopes is None or alibi_slopes.dim() == 1 else alibi_slopes[b]
        out[rows], lse[:, rows] = (t[0] for t in attention_ref(q_b, k_b, v_b, alibi_slopes=slopes, **attn_kwargs))
    return out, lse


def assert_close_varlen(out, q, k, v, cu_seqlens_q, cu_seqlens_k, *, lse=None, block_table=None, alibi_slopes=None,
                        factor: float = 3.0, **attn_kwargs) -> None:
    """A varlen call's out (and lse) against the float64 reference, each sequence with `tolerance`'s bound for its
    own shapes (no NaN anywhere)."""
    assert out.shape == q.shape and out.dtype == q.dtype, (out.shape, out.dtype, q.shape, q.dtype)
    if lse is not None:
        assert lse.shape == (q.shape[1], q.shape[0]) and lse.dtype == torch.float32, (lse.shape, lse.dtype)
    for b, rows, q_b, k_b, v_b in varlen_sequences(q, k, v, cu_seqlens_q, cu_seqlens_k, block_table):
        slopes = alibi_slopes if alibi_slopes is None or alibi_slopes.dim() == 1 else alibi_slopes[b]
        kwargs = dict(attn_kwargs, alibi_slopes=slopes)
        ref, ref_lse = attention_ref(q_b, k_b, v_b, **kwargs)
        try:
            _assert_rows_close(out[None, rows], ref, tolerance(q_b, k_b, v_b, factor=factor, **kwargs))
            if lse is not None:
                _assert_lse_close(lse[None, :, rows], ref_lse, q_b)
        except AssertionError as e:
            raise AssertionError(f"sequence {b} (rows {rows.start}..{rows.stop - 1}, {k_b.shape[1]} keys): {e}") \
                from None
