"""attn_varlen's workloads, shared by its tuning problem (tuning.py) and its bench suites (bench.py): batches of
sequence lengths, their inputs (packed or paged) and their check against the float64 reference (a batch's useful
FLOPs: flashcore/counts.py). Tools only: the runtime never imports this module.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

import torch

from ...counts import nbytes
from ...dtypes import TORCH_DTYPES
from ...reference import max_error
from ..bench_common import shuffled_table


# ---------------------------------------------------------------------------------------------- lengths

def draw_lengths(total: int, low: int, high: int, seed) -> tuple[int, ...]:
    """Lengths drawn uniformly from [low, high] (random.Random(seed): the same on every machine and run) until they
    add up to `total` exactly: the last one is what is left (at most high; at least low unless total < low)."""
    draw = seed if isinstance(seed, random.Random) else random.Random(seed)
    out, left = [], total
    while left > high:
        n = draw.randint(low, max(low, min(high, left - low)))
        out.append(n)
        left -= n
    if left > 0:
        out.append(left)
    return tuple(out)


def bucket_lengths(total_q: int, max_q: int, max_k: int, seed: int = 0) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(query lengths, key lengths) of the batch a tuning bucket is measured on: total_q tokens in all, the bucket's
    corner in its first sequence, a seeded distribution in the rest.

    max_k == max_q  a mixed prefill batch: self-attention (Sk = Sq), the first sequence max_q long, the others drawn
                    uniformly from [max_q / 64, max_q] (the bench's mixed batch: 64..4096 at 4096), at most half
                    of what is left each (so that two corners' worth of tokens is still a mix: 16k + 8k + ...)
    max_k > max_q   chunked prefill: chunks of max_q new tokens (the last one what is left) against a prefix in
                    the cache; the first sequence has max_k keys, the others between max(chunk, max_k / 4) and max_k
    max_k < max_q   queries past the keys (bottom-right aligned): the mixed batch, keys scaled by max_k / max_q
    """
    draw = random.Random(f"attn_varlen/{total_q}/{max_q}/{max_k}/{seed}")
    max_q, max_k = max(1, max_q), max(1, max_k)
    if max_k > max_q:
        q = [max_q] * (total_q // max_q) + ([total_q % max_q] if total_q % max_q else [])
        k_low = max(max_q, max_k // 4)
        k = [max_k] + [draw.randint(max(n, k_low), max_k) for n in q[1:]]
        return tuple(q), tuple(k)
    first = min(max_q, total_q)
    rest, low = total_q - first, max(1, max_q // 64)
    q = (first,) + draw_lengths(rest, low, min(max_q, max(low, rest // 2)), draw) if total_q else ()
    k = q if max_k == max_q else tuple(max(1, n * max_k // max_q) for n in q)
    return q, k


def even_lengths(batch: int, total_q: int, max_q: int, max_k: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """A batch of `batch` sequences of nearly equal lengths (a call whose batch is not bucket_lengths'): queries
    split evenly; keys equal to them (max_k == max_q), behind a prefix of max_k - max_q keys, or scaled."""
    if batch < 1 or total_q > batch * max_q:
        raise ValueError(f"{total_q} tokens do not fit {batch} sequences of at most {max_q}")
    q = tuple(total_q // batch + (b < total_q % batch) for b in range(batch))
    if max_k == max_q:
        return q, q
    if max_k > max_q:
        return q, tuple(n + max_k - max_q for n in q)
    return q, tuple(max(1, n * max_k // max_q) for n in q)


# ---------------------------------------------------------------------------------------------- inputs

@dataclass
class VarlenInputs:
    """One packed batch on one device, as flash_attn_varlen_func takes it."""
    q: torch.Tensor                       # (total_q, Hq, D)
    k: torch.Tensor                       # packed (total_k, Hkv, D) or paged (num_blocks, page_size, Hkv, D)
    v: torch.Tensor
    cu_seqlens_q: torch.Tensor            # (B + 1,) int32
    cu_seqlens_k: torch.Tensor            # (B + 1,) int32: keys of each sequence (paged: in the cache)
    seqused_k: torch.Tensor               # (B,) int32: the key lengths (FA4's paged argument)
    block_table: torch.Tensor | None      # (B, max blocks) int32, shuffled; entries past a sequence's blocks 0
    seqlens_q: tuple[int, ...]
    seqlens_k: tuple[int, ...]
    max_seqlen_q: int
    max_seqlen_k: int
    page_size: int = 0

    @property
    def batch(self) -> int:
        return len(self.seqlens_q)


def cu_seqlens(lengths: Sequence[int], device) -> torch.Tensor:
    out = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    out[1:] = torch.cumsum(torch.tensor(list(lengths), dtype=torch.int64), 0)
    return out.to(device)


def blocks_of(seqlens_k: Sequence[int], page_size: int) -> list[int]:
    """Cache blocks each sequence's keys fill (whole blocks)."""
    return [-(-n // page_size) for n in seqlens_k]


def make_inputs(seqlens_q: Sequence[int], seqlens_k: Sequence[int], heads_q: int, heads_kv: int, head_dim: int,
                dtype: str, page_size: int = 0, device="cuda", max_seqlen_q: int | None = None,
                max_seqlen_k: int | None = None, spare_blocks: int = 0) -> VarlenInputs:
    """Random q, k, v (torch's global seed) for the lengths: k / v packed like q, or (page_size) a paged cache
    whose pool holds exactly the blocks the sequences fill (plus `spare_blocks` never referenced), read through a
    shuffled block table. max_seqlen: the longest lengths unless given (larger ones only change the bucket)."""
    torch_dtype = TORCH_DTYPES[dtype]
    seqlens_q, seqlens_k = tuple(seqlens_q), tuple(seqlens_k)
    if len(seqlens_q) != len(seqlens_k):
        raise ValueError(f"{len(seqlens_q)} query lengths but {len(seqlens_k)} key lengths")
    q = torch.randn(sum(seqlens_q), heads_q, head_dim, device=device, dtype=torch_dtype)
    kv_shape = (heads_kv, head_dim)
    block_table = None
    if page_size:
        used = blocks_of(seqlens_k, page_size)
        block_table = shuffled_table(used, max(1, max(used, default=1))).to(device)
        rows = (sum(used) + spare_blocks, page_size)
    else:
        rows = (sum(seqlens_k),)
    k = torch.randn(*rows, *kv_shape, device=device, dtype=torch_dtype)
    v = torch.randn(*rows, *kv_shape, device=device, dtype=torch_dtype)
    return VarlenInputs(q, k, v, cu_seqlens(seqlens_q, device), cu_seqlens(seqlens_k, device),
                        torch.tensor(seqlens_k, dtype=torch.int32, device=device), block_table, seqlens_q, seqlens_k,
                        max(seqlens_q, default=0) if max_seqlen_q is None else max_seqlen_q,
                        max(seqlens_k, default=0) if max_seqlen_k is None else max_seqlen_k, page_size)


def input_bytes(inputs: VarlenInputs) -> int:
    """q, k, v and an output like q: one set's bytes (what a timing rotation touches)."""
    return nbytes(inputs.q, inputs.k, inputs.v, inputs.q)


def sequence_rows(inputs: VarlenInputs, b: int) -> slice:
    start = sum(inputs.seqlens_q[:b])
    return slice(start, start + inputs.seqlens_q[b])


def sequence_keys(inputs: VarlenInputs, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(k, v) each (Sk_b, Hkv, D): the keys sequence b attends, read from the packed rows or through its blocks."""
    n = inputs.seqlens_k[b]
    if inputs.block_table is None:
        start = sum(inputs.seqlens_k[:b])
        return inputs.k[start:start + n], inputs.v[start:start + n]
    blocks = inputs.block_table[b, :-(-n // inputs.page_size)].long()
    return tuple(cache[blocks].flatten(0, 1)[:n] for cache in (inputs.k, inputs.v))


def sequence_errors(out: torch.Tensor, inputs: VarlenInputs, b: int, causal: bool, rows: int | None = None,
                    window: tuple[int, int] = (-1, -1)) -> list[tuple[float, float]]:
    """[(max error, tolerance)] of sequence b's output rows against the float64 reference, with the tolerance
    rule of reference.tolerance for the sequence's own shapes (assert_close_varlen's rule). rows: check only the
    first and the last `rows` query rows of a longer sequence (a float64 reference of a 16k-token sequence would not
    fit): the first ones against the keys up to their positions (causal) so that the bottom-right alignment holds,
    the last ones against every key."""
    sel = sequence_rows(inputs, b)
    q = inputs.q[sel][None]
    k, v = (t[None] for t in sequence_keys(inputs, b))
    o = out[sel][None]
    sq, sk = q.shape[1], k.shape[1]
    kwargs = dict(causal=causal, window_size=window)
    if rows is None or sq <= 2 * rows or (window != (-1, -1)):
        return [max_error(o, q, k, v, **kwargs)]
    first_keys = max(0, rows + sk - sq) if causal else sk
    return [max_error(o[:, :rows], q[:, :rows], k[:, :first_keys], v[:, :first_keys], **kwargs),
            max_error(o[:, -rows:], q[:, -rows:], k, v, **kwargs)]
