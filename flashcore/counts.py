"""What an attention call computes and moves, counted the same way by the profiler (flashcore.profile), the tuner
and the bench suites.

Useful FLOPs count real tokens only: per sequence 4 * Hq * D FLOPs (QK^T and PV, two FLOPs per multiply-add) for
every (query row, key) pair the row attends, i.e. 4 * Sq * Sk * D * Hq without a mask; with causal (bottom-right
aligned, as the kernels and the reference align it) or a window, exactly the keys each row sees. Padding, and the
masked half of a diagonal tile, count nothing.
"""
from __future__ import annotations

from typing import Sequence


def _sum_positive(a: int, slope: int, lo: int, hi: int) -> int:
    """sum of max(0, a + slope * p) for p in [lo, hi), slope in (-1, 0, 1)."""
    if hi <= lo:
        return 0
    if slope == 0:
        return (hi - lo) * max(0, a)
    if slope > 0:                      # positive from p > -a on
        lo = max(lo, 1 - a)
        first, last = a + lo, a + hi - 1
    else:                              # positive while p < a
        hi = min(hi, a)
        first, last = a - (hi - 1), a - lo
    return (first + last) * (hi - lo) // 2 if hi > lo else 0


def visible_keys(seqlen_q: int, seqlen_k: int, causal: bool = False, window: tuple[int, int] = (-1, -1)) -> int:
    """(query row, key) pairs one sequence attends: row i sits at position p = i + Sk - Sq and sees keys j with
    p - left <= j <= p + right, 0 <= j < Sk (causal: right = 0; -1 = unbounded), the reference's mask. Closed form:
    over the rows the count is piecewise linear (slopes -1, 0, 1) between the points where a window side reaches
    the sequence's first or last key."""
    if seqlen_q <= 0 or seqlen_k <= 0:
        return 0
    left, right = window
    if causal:
        right = 0
    unbounded = seqlen_q + seqlen_k + 1          # a side this wide reaches every key from every row
    left = unbounded if left < 0 else min(left, unbounded)
    right = unbounded if right < 0 else min(right, unbounded)
    first, end = seqlen_k - seqlen_q, seqlen_k   # positions of the rows: [first, end)
    # hi(p) = min(Sk - 1, p + right) switches at p = Sk - 1 - right; lo(p) = max(0, p - left) at p = left
    cuts = sorted({first, end, min(max(seqlen_k - 1 - right, first), end), min(max(left, first), end)})
    total = 0
    for a, b in zip(cuts, cuts[1:]):
        # within [a, b) both sides are linear: count(p) = hi(p) - lo(p) + 1
        hi_const, hi_slope = (seqlen_k - 1, 0) if a >= seqlen_k - 1 - right else (right, 1)
        lo_const, lo_slope = (0, 0) if a < left else (-left, 1)
        total += _sum_positive(hi_const - lo_const + 1, hi_slope - lo_slope, a, b)
    return total


def useful_flops(seqlens_q: Sequence[int], seqlens_k: Sequence[int], heads_q: int, head_dim: int,
                 causal: bool = False, window: tuple[int, int] = (-1, -1)) -> int:
    """FLOPs of real tokens only: 4 * Hq * D per (row, key) pair each sequence attends (visible_keys)."""
    return 4 * heads_q * head_dim * sum(visible_keys(sq, sk, causal, window) for sq, sk in zip(seqlens_q, seqlens_k))


# backward FLOPs per forward FLOP, as the peers count them: five matmuls (QK^T and dP recomputed, dV, dQ, dK) to the
# forward's two
BACKWARD_FLOPS = 2.5


def nbytes(*tensors) -> int:
    """Bytes of the tensors' elements (a strided view counts its own elements, not its storage); None counts 0."""
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)
