"""flash_attn_varlen_func (and its kv / qkv packed variants) against the float64 per-sequence reference
(flashcore/reference.py: varlen_ref, assert_close_varlen).

CPU, Triton interpreter, fp16 and fp32, small shapes (CI runs this on 2 cores); on a GPU machine the same tests run
the real kernels, bf16 included, with `-m gpu_extended`. Covered: sequence lengths 0 and 1 (empty sequences in the
middle and at the end), seqlen_q != seqlen_k per sequence both ways (rows that see no key: 0 and lse -inf), causal
and not, MQA / GQA (groups 1, 4, 7, 8), sliding windows (one- and two-sided), softcap, ALiBi ((Hq,) and (B, Hq)),
head dims 64 / 80 / 128 / 256, a 257-token sequence, more sequences than one tile search chunk (GPU only),
explicit tile configs; paged K/V (block sizes 1, 16, 64, 256, shuffled tables over more blocks than used),
chunked prefill over a paged prefix, spare table columns holding garbage; packed qkv / kv views (no copy);
return_attn_probs; uniform lengths against flash_attn_func; a kept plan re-run with other cu_seqlens and
block-table values.

Every test draws fresh random inputs (conftest seeds per test id) and every call runs with poisoned allocations
(out and lse NaN-filled), so a row the kernel forgets to write fails; assert_close_varlen compares every row
(no NaN). Memory a call must not read holds NaN: the rows just past q / k / v (they are views of longer
NaN-tailed buffers) and every cache slot of a paged cache that no sequence's keys occupy.
"""
from __future__ import annotations

import itertools
import os

import pytest
import torch
import triton

import flashcore
from flashcore import dispatch
from flashcore import varlen as varlen_module
from flashcore.ops.attn_varlen import host
from flashcore.reference import LSE_ATOL, assert_close_varlen, tolerance, varlen_ref
from poison import poisoned_allocations

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
FP16, BF16, FP32 = torch.float16, torch.bfloat16, torch.float32
# The interpreter's tl.dot is wrong for bf16 (Triton 3.6 / 3.9): bf16 only on the GPU.
DTYPES = [FP16, FP32] if INTERPRET else [FP16, BF16, FP32]
dtype_ids = {FP16: "fp16", BF16: "bf16", FP32: "fp32"}
# On a GPU machine (no TRITON_INTERPRET) these same tests run the real kernels, bf16 included, with -m gpu_extended.
pytestmark = [] if INTERPRET else [pytest.mark.gpu_extended]


# ---------------------------------------------------------------------------------------------------------------
# building inputs

def cu_seqlens(lengths, device) -> torch.Tensor:
    return torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=device)


def nan_tailed(rows, heads, head_dim, dtype, device, scale=1.0, tail=40) -> torch.Tensor:
    """(rows, heads, head_dim) random values: the first rows of a buffer whose next `tail` rows are NaN, so a read
    past the tensor's end shows in the output."""
    buffer = torch.full((rows + tail, heads, head_dim), float("nan"), dtype=dtype, device=device)
    buffer[:rows] = (torch.randn(rows, heads, head_dim, device=device) * scale).to(dtype)
    return buffer[:rows]


def make_varlen(lens_q, lens_k, heads_q, heads_kv, head_dim, dtype, device, scale=1.0) -> dict:
    """A packed call's arguments: q (sum(lens_q), Hq, D), k / v (sum(lens_k), Hkv, D), cu_seqlens, max_seqlen."""
    return dict(q=nan_tailed(sum(lens_q), heads_q, head_dim, dtype, device, scale),
                k=nan_tailed(sum(lens_k), heads_kv, head_dim, dtype, device, scale),
                v=nan_tailed(sum(lens_k), heads_kv, head_dim, dtype, device),
                cu_seqlens_q=cu_seqlens(lens_q, device), cu_seqlens_k=cu_seqlens(lens_k, device),
                max_seqlen_q=max(lens_q, default=0), max_seqlen_k=max(lens_k, default=0))


def paged_cache(lens_k, block_size, heads_kv, head_dim, dtype, device, spare_columns=1, spare_blocks=3):
    """(k_cache, v_cache, block_table): a paged cache (num_blocks, block_size, Hkv, D) holding each sequence's keys
    through a shuffled block table (a permutation of more blocks than the table uses), with `spare_columns`
    columns past the longest sequence's blocks; every slot no sequence's keys occupy is NaN."""
    batch = len(lens_k)
    max_blocks = triton.cdiv(max(max(lens_k), 1), block_size) + spare_columns
    num_blocks = batch * max_blocks + spare_blocks
    table = torch.randperm(num_blocks)[: batch * max_blocks].reshape(batch, max_blocks)
    caches = []
    for _ in ("k", "v"):
        cache = torch.full((num_blocks, block_size, heads_kv, head_dim), float("nan"), dtype=dtype)
        for b, keys in enumerate(lens_k):
            position = torch.arange(keys)
            cache[table[b, position // block_size], position % block_size] = \
                torch.randn(keys, heads_kv, head_dim).to(dtype)
        caches.append(cache.to(device))
    return caches[0], caches[1], table.to(torch.int32).to(device)


def make_paged(lens_q, lens_k, block_size, heads_q, heads_kv, head_dim, dtype, device, **cache_kwargs) -> dict:
    """A paged call's arguments: q packed, keys (prefix and new tokens together) in a paged cache."""
    k_cache, v_cache, block_table = paged_cache(lens_k, block_size, heads_kv, head_dim, dtype, device,
                                                **cache_kwargs)
    return dict(make_varlen(lens_q, [0], heads_q, heads_kv, head_dim, dtype, device), k=k_cache, v=v_cache,
                cu_seqlens_k=cu_seqlens(lens_k, device), max_seqlen_k=max(lens_k), block_table=block_table)


def run_and_check(args: dict, factor=3.0, **kwargs):
    """flash_attn_varlen_func with poisoned allocations and return_attn_probs; out and lse of every sequence
    against the float64 reference. Returns (out, lse)."""
    with poisoned_allocations():
        res = flashcore.flash_attn_varlen_func(**args, **kwargs, return_attn_probs=True)
    assert isinstance(res, tuple) and len(res) == 3 and res[2] is None
    out, lse = res[:2]
    assert out.is_contiguous() and out.device == args["q"].device
    assert lse.shape == (args["q"].shape[1], args["q"].shape[0]) and lse.dtype == FP32 and lse.is_contiguous()
    check(out, args, lse=lse, factor=factor, **kwargs)
    return out, lse


def check(out, args: dict, lse=None, factor=3.0, **kwargs) -> None:
    """out (and lse) of a call of `args` with options `kwargs` against the float64 reference."""
    window = kwargs.pop("window_size", (-1, -1))
    assert_close_varlen(out, args["q"], args["k"], args["v"], args["cu_seqlens_q"], args["cu_seqlens_k"], lse=lse,
                        block_table=args.get("block_table"), factor=factor, window_size=window, **kwargs)


def assert_blind_rows_zero(out, lse, lens_q, lens_k, causal) -> None:
    """Rows that see no key (causal with more queries than keys: the first Sq - Sk; no key at all: every row) are
    exactly 0 with lse -inf, and the others have a finite lse."""
    start = 0
    for sq, sk in zip(lens_q, lens_k):
        blind = sq if sk == 0 else max(sq - sk, 0) if causal else 0
        rows = slice(start, start + blind)
        assert torch.equal(out[rows], torch.zeros_like(out[rows])), "rows that see no key must be 0"
        assert torch.isneginf(lse[:, rows]).all()
        assert torch.isfinite(lse[:, start + blind: start + sq]).all()
        start += sq


# ---------------------------------------------------------------------------------------------------------------
# the reference itself

def test_varlen_ref_matches_sdpa_per_sequence():
    """varlen_ref is attention per sequence: each sequence's rows equal PyTorch's SDPA on that sequence alone."""
    lens = [5, 0, 9, 1]
    args = make_varlen(lens, lens, 2, 2, 16, torch.float64, "cpu")
    out, lse = varlen_ref(args["q"], args["k"], args["v"], args["cu_seqlens_q"], args["cu_seqlens_k"], causal=True)
    start = 0
    for n in lens:
        q, k, v = (args[name][start: start + n].transpose(0, 1) for name in ("q", "k", "v"))
        sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(0, 1)
        torch.testing.assert_close(out[start: start + n], sdpa, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(lse[:, start: start + n], (q @ k.transpose(-1, -2) * 16 ** -0.5).masked_fill(
            torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf")).logsumexp(-1), rtol=1e-10, atol=1e-10)
        start += n


# ---------------------------------------------------------------------------------------------------------------
# sequence lengths

@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_ids.get)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_mixed_lengths_with_empty_and_single_token_sequences(causal, dtype, device):
    """Lengths 0 and 1, an empty sequence in the middle and one at the end, sequences across tile edges."""
    lens = [5, 0, 33, 1, 17, 0]
    run_and_check(make_varlen(lens, lens, 2, 1, 64, dtype, device), causal=causal)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("lens_q,lens_k", [
    # more keys than queries (chunked prefill), more queries than keys (causal: the first Sq - Sk rows see no
    # key), queries without keys, keys without queries, single tokens on either side
    ([3, 30, 1, 20, 7, 0], [40, 9, 33, 0, 7, 12]),
    ([1, 45, 0, 2], [1, 1, 5, 37]),
], ids=["mixed", "decode_and_blind"])
def test_seqlen_q_differs_from_seqlen_k_per_sequence(lens_q, lens_k, causal, device):
    args = make_varlen(lens_q, lens_k, 2, 1, 64, FP16, device)
    out, lse = run_and_check(args, causal=causal)
    assert_blind_rows_zero(out, lse, lens_q, lens_k, causal)


def test_no_query_rows_at_all(device):
    """total_q = 0 (every sequence empty on the query side): empty out and lse, nothing launched."""
    args = make_varlen([0, 0, 0], [4, 0, 9], 2, 2, 64, FP16, device)
    out, lse, _ = flashcore.flash_attn_varlen_func(**args, causal=True, return_attn_probs=True)
    assert out.shape == (0, 2, 64) and out.dtype == FP16 and lse.shape == (2, 0) and lse.dtype == FP32


def test_seqlen_257(device):
    """A sequence of 257 tokens (9 row and key tiles, the last partial) packed after a short one."""
    lens = [3, 257, 10]
    run_and_check(make_varlen(lens, lens, 1, 1, 64, FP16, device), causal=True)


def test_more_sequences_than_one_tile_search_chunk(device, monkeypatch):
    """The tile search and the batch's value check read the sequences in chunks (host.MAX_SEQ_CHUNK, 256): with
    chunks of 16, 40 sequences of 0 to 3 tokens take three, the last one partial."""
    from flashcore.ops.attn_varlen import host
    monkeypatch.setattr(host, "MAX_SEQ_CHUNK", 16)
    dispatch.clear()                                   # (a kept plan holds its chunk size)
    lens_q = torch.randint(0, 4, (40,)).tolist()
    lens_k = torch.randint(0, 4, (40,)).tolist()
    lens_q[-3:], lens_k[-3:] = [2, 0, 3], [3, 0, 1]    # the last chunk has rows, an empty sequence and a blind row
    args = make_varlen(lens_q, lens_k, 1, 1, 32, FP32, device)
    out, lse = run_and_check(args, causal=True)
    assert_blind_rows_zero(out, lse, lens_q, lens_k, causal=True)
    dispatch.clear()


# ---------------------------------------------------------------------------------------------------------------
# heads, head dims

@pytest.mark.parametrize("heads_q,heads_kv,causal", [
    (2, 2, False),    # group 1
    (8, 2, True),     # group 4
    (8, 1, False),    # group 8, MQA
    (7, 1, True),     # group 7, MQA
])
def test_gqa_and_mqa(heads_q, heads_kv, causal, device):
    lens_q, lens_k = [5, 0, 20, 1], [12, 4, 20, 1]
    run_and_check(make_varlen(lens_q, lens_k, heads_q, heads_kv, 64, FP16, device), causal=causal)


def test_gqa_reads_kv_head_by_index(device):
    """Query head h reads kv head h // group: heads 0-1 see kv head 0 (v = 1), heads 2-3 kv head 1 (v = -1)."""
    lens = [7, 0, 20]
    args = make_varlen(lens, lens, 4, 2, 64, FP32, device)
    v = args["v"].clone()
    v[:, 0], v[:, 1] = 1.0, -1.0
    out = flashcore.flash_attn_varlen_func(**dict(args, v=v), causal=True)
    torch.testing.assert_close(out[:, :2], torch.ones_like(out[:, :2]))
    torch.testing.assert_close(out[:, 2:], -torch.ones_like(out[:, 2:]))


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_ids.get)
@pytest.mark.parametrize("head_dim,lens_q,lens_k,heads", [
    (80, [9, 0, 40, 1], [30, 2, 40, 1], (2, 1)),     # not a power of two: padded to 128 and masked
    (128, [6, 19], [11, 19], (2, 1)),
    (256, [5, 0, 12], [9, 1, 12], (2, 2)),
], ids=["d80", "d128", "d256"])
def test_head_dims(head_dim, lens_q, lens_k, heads, dtype, device):
    run_and_check(make_varlen(lens_q, lens_k, *heads, head_dim, dtype, device), causal=True)


# ---------------------------------------------------------------------------------------------------------------
# masks and score modifiers

@pytest.mark.parametrize("window,causal", [
    ((16, -1), False),    # left only
    ((-1, 8), False),     # right only
    ((10, 5), False),     # both sides
    ((0, 0), False),      # each row sees its diagonal key only
    ((24, -1), True),     # left + causal (local causal)
    ((5, 100), True),     # causal overrides the right side
    ((200, 200), False),  # wider than every sequence: no window
], ids=lambda x: str(x).replace(" ", ""))
def test_window(window, causal, device):
    lens_q, lens_k = [30, 40, 1, 0, 9], [50, 20, 1, 3, 9]
    run_and_check(make_varlen(lens_q, lens_k, 2, 1, 64, FP16, device), causal=causal, window_size=window)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_ids.get)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_softcap(causal, dtype, device):
    lens_q, lens_k = [20, 0, 35, 1], [20, 6, 50, 1]
    args = make_varlen(lens_q, lens_k, 2, 2, 64, dtype, device, scale=2.0)   # large scores: the cap bites
    run_and_check(args, causal=causal, softcap=5.0)


def test_softcap_window_gqa_and_softmax_scale(device):
    lens_q, lens_k = [25, 3, 40], [40, 3, 28]
    args = make_varlen(lens_q, lens_k, 2, 1, 80, FP16, device, scale=2.0)
    run_and_check(args, causal=True, window_size=(12, -1), softcap=10.0, softmax_scale=0.3)


@pytest.mark.parametrize("per_sequence,causal,window", [
    (False, False, (-1, -1)),
    (False, False, (20, 7)),
    (True, True, (-1, -1)),     # each sequence its own slopes
], ids=["slopes_Hq-full", "slopes_Hq-window", "slopes_B_Hq-causal"])
def test_alibi(per_sequence, causal, window, device):
    lens_q, lens_k = [17, 0, 40, 1], [30, 5, 40, 9]
    args = make_varlen(lens_q, lens_k, 2, 1, 64, FP16, device)
    slopes = torch.rand(len(lens_q), 2) if per_sequence else torch.rand(2)
    run_and_check(args, causal=causal, window_size=window, alibi_slopes=slopes.to(device))


# ---------------------------------------------------------------------------------------------------------------
# paged K/V

@pytest.mark.parametrize("block_size,causal", [(1, True), (16, False), (64, True), (256, False)])
def test_paged_block_sizes(block_size, causal, device):
    """Shuffled block tables over more blocks than used; sequences shorter, longer than and equal to a block."""
    lens_q, lens_k = [9, 0, 30, 1], [37, 0, 70, 16]
    run_and_check(make_paged(lens_q, lens_k, block_size, 2, 1, 64, FP16, device), causal=causal)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_ids.get)
def test_chunked_prefill_over_a_paged_prefix(dtype, device):
    """q holds only the new tokens; the cache holds each sequence's prefix and new tokens (cu_seqlens_k counts
    both): causal bottom-right, so the new tokens see the whole prefix and each other causally. Prefixes longer
    and shorter than the chunks, an empty prefix, a sequence with no new token."""
    prefix, new = [40, 0, 7, 20, 5], [8, 13, 30, 0, 1]
    keys = [p + n for p, n in zip(prefix, new)]
    run_and_check(make_paged(new, keys, 16, 2, 1, 64, dtype, device), causal=True)


def test_paged_head_dim_80_window_alibi(device):
    lens_q, lens_k = [6, 30], [50, 30]
    args = make_paged(lens_q, lens_k, 16, 2, 1, 80, FP16, device)
    run_and_check(args, causal=True, window_size=(18, -1), alibi_slopes=torch.rand(2, device=device))


GARBAGE = [-1, -(2**31), 2**31 - 1]     # and num_blocks: every spare column entry out of range


@pytest.mark.parametrize("mode", ["auto", "deferred"])
@pytest.mark.parametrize("block_size", [1, 16])
def test_spare_block_table_columns_are_not_read(block_size, mode, device, kv_checks):
    """A table row's columns past its sequence's keys hold out-of-range entries: no error (at the call, from the
    kernel's check, or at the next call) and the right answer. "auto" checks on the host for CPU tensors,
    "deferred" in the kernel."""
    kv_checks(mode)
    lens_q, lens_k = [4, 0, 20], [block_size + 1, 0, 3 * block_size]
    args = make_paged(lens_q, lens_k, block_size, 2, 1, 64, FP16, device, spare_columns=3)
    table = args["block_table"]
    num_blocks = args["k"].shape[0]
    for b, keys in enumerate(lens_k):
        used = triton.cdiv(keys, block_size)
        spare = table.shape[1] - used
        table[b, used:] = torch.tensor((GARBAGE + [num_blocks]) * spare, dtype=torch.int32)[:spare]
    run_and_check(args, causal=True)
    flashcore.check_errors()


# ---------------------------------------------------------------------------------------------------------------
# packed views

class _Spy:
    """Records the q, k, v the packed functions hand to the op."""

    def __init__(self, monkeypatch):
        self.seen = []
        real = varlen_module.varlen_attention

        def spy(q, k, v, *args, **kwargs):
            self.seen.append((q, k, v))
            return real(q, k, v, *args, **kwargs)
        monkeypatch.setattr(varlen_module, "varlen_attention", spy)


def _assert_views_of(packed, tensors) -> None:
    for i, t in enumerate(tensors):
        assert t.untyped_storage().data_ptr() == packed.untyped_storage().data_ptr(), "a copy, not a view"
        assert t.data_ptr() == packed[:, i].data_ptr() and t.stride() == packed[:, i].stride()


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_qkvpacked_passes_views_and_equals_the_unpacked_call(causal, device, monkeypatch):
    lens = [11, 0, 40, 1]
    qkv = torch.randn(sum(lens), 3, 2, 64, device=device).to(FP16)
    cu = cu_seqlens(lens, device)
    spy = _Spy(monkeypatch)
    with poisoned_allocations():
        out, lse, none = flashcore.flash_attn_varlen_qkvpacked_func(qkv, cu, max(lens), causal=causal,
                                                                    window_size=(20, -1), return_attn_probs=True)
    assert none is None
    _assert_views_of(qkv, spy.seen[0])
    q, k, v = (qkv[:, i].contiguous() for i in range(3))
    args = dict(q=q, k=k, v=v, cu_seqlens_q=cu, cu_seqlens_k=cu)
    check(out, args, lse=lse, causal=causal, window_size=(20, -1))
    unpacked, unpacked_lse, _ = flashcore.flash_attn_varlen_func(q, k, v, cu, cu, max(lens), max(lens),
                                                                 causal=causal, window_size=(20, -1),
                                                                 return_attn_probs=True)
    assert torch.equal(out, unpacked) and torch.equal(lse, unpacked_lse), "packed and unpacked calls differ"


def test_kvpacked_passes_views_and_equals_the_unpacked_call(device, monkeypatch):
    lens_q, lens_k = [7, 30, 0, 2], [20, 30, 4, 0]
    q = torch.randn(sum(lens_q), 2, 64, device=device).to(FP16)
    kv = torch.randn(sum(lens_k), 2, 1, 64, device=device).to(FP16)
    cu_q, cu_k = cu_seqlens(lens_q, device), cu_seqlens(lens_k, device)
    spy = _Spy(monkeypatch)
    with poisoned_allocations():
        out, lse, _ = flashcore.flash_attn_varlen_kvpacked_func(q, kv, cu_q, cu_k, max(lens_q), max(lens_k),
                                                                causal=True, softcap=8.0, return_attn_probs=True)
    assert spy.seen[0][0] is q
    _assert_views_of(kv, spy.seen[0][1:])
    k, v = kv[:, 0].contiguous(), kv[:, 1].contiguous()
    check(out, dict(q=q, k=k, v=v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k), lse=lse, causal=True, softcap=8.0)
    unpacked = flashcore.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), causal=True,
                                                softcap=8.0)
    assert torch.equal(out, unpacked), "packed and unpacked calls differ"


# ---------------------------------------------------------------------------------------------------------------
# return_attn_probs, the dense function, kept plans, explicit tiles

@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_ids.get)
def test_return_attn_probs_gives_out_lse_none(dtype, device):
    lens_q, lens_k = [12, 0, 33, 1], [12, 5, 20, 0]
    args = make_varlen(lens_q, lens_k, 2, 1, 64, dtype, device)
    out, lse = run_and_check(args, causal=True)           # (out, lse (Hq, total_q) fp32, None), lse checked
    assert_blind_rows_zero(out, lse, lens_q, lens_k, causal=True)
    plain = flashcore.flash_attn_varlen_func(**args, causal=True)
    assert isinstance(plain, torch.Tensor)
    assert torch.equal(plain, out), "return_attn_probs must not change out"


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_uniform_lengths_match_flash_attn_func(causal, device):
    """B sequences of S tokens: varlen on the packed rows equals flash_attn_func on them as (B, S, H, D), out within
    the tolerance and lse (Hq, B * S) within LSE_ATOL of the dense (B, Hq, S)."""
    batch, seqlen_q, seqlen_k = 3, 24, 40
    args = make_varlen([seqlen_q] * batch, [seqlen_k] * batch, 2, 1, 64, FP16, device)
    out, lse, _ = flashcore.flash_attn_varlen_func(**args, causal=causal, window_size=(30, -1),
                                                   return_attn_probs=True)
    q, k, v = (args[name].reshape(batch, -1, *args[name].shape[1:]) for name in ("q", "k", "v"))
    dense, dense_lse = flashcore.flash_attn_func(q, k, v, causal=causal, window_size=(30, -1), return_lse=True)
    atol = tolerance(q, k, v, causal=causal, window_size=(30, -1))
    torch.testing.assert_close(out.reshape(dense.shape), dense, rtol=0, atol=atol)
    torch.testing.assert_close(lse.reshape(2, batch, seqlen_q).transpose(0, 1), dense_lse, rtol=0,
                               atol=LSE_ATOL[FP16])


def test_kept_plan_reruns_with_other_cu_seqlens(device):
    """Same shapes and max_seqlen, other cu_seqlens values: the second call reuses the first call's plan (no new
    one kept) and is right for its own lengths, and so is the first signature called again."""
    first = make_varlen([10, 30, 0, 20], [10, 30, 5, 20], 2, 1, 64, FP16, device)
    second = make_varlen([30, 0, 25, 5], [30, 20, 0, 15], 2, 1, 64, FP16, device)
    for args in (first, second):
        args.update(max_seqlen_q=32, max_seqlen_k=32)      # fixed buckets (as a CUDA graph keeps them)
    run_and_check(first, causal=True)
    plans = len(host._plans)
    run_and_check(second, causal=True)
    assert len(host._plans) == plans, "the second call made a new plan: it did not exercise the kept one"
    run_and_check(first, causal=True)


def test_kept_paged_plan_reruns_with_other_lengths_and_table(device):
    """A paged call's kept plan with other cu_seqlens, another block table and other cache contents."""
    first = make_paged([4, 20], [30, 20], 16, 2, 1, 64, FP16, device)
    second = make_paged([20, 4], [20, 32], 16, 2, 1, 64, FP16, device)
    assert first["block_table"].shape == second["block_table"].shape and first["k"].shape == second["k"].shape
    for args in (first, second):
        args.update(max_seqlen_q=20, max_seqlen_k=40)
    run_and_check(first, causal=True)
    plans = len(host._plans)
    run_and_check(second, causal=True)
    assert len(host._plans) == plans, "the second call made a new plan: it did not exercise the kept one"


CONFIGS = [
    {"BLOCK_M": 16, "BLOCK_N": 64, "num_warps": 4, "num_stages": 1},
    {"BLOCK_M": 64, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1},
    {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 2, "num_stages": 1},
]


@pytest.mark.parametrize("paged", [False, True], ids=["packed", "paged"])
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"m{c['BLOCK_M']}n{c['BLOCK_N']}")
def test_explicit_tile_configs(config, paged, device):
    """Tiles smaller and larger than the sequences (what the tuner launches): several row blocks per sequence,
    key tiles across page edges."""
    lens_q, lens_k = [5, 0, 40, 17], [33, 2, 40, 9]
    args = make_paged(lens_q, lens_k, 24, 2, 1, 64, FP16, device) if paged else \
        make_varlen(lens_q, lens_k, 2, 1, 64, FP16, device)
    run_with_config(args, config)


def run_with_config(args: dict, config: dict) -> None:
    """The op's host function with an explicit tile config (as the tuner launches it), causal with a left window of
    12, checked against the reference."""
    with poisoned_allocations():
        out, lse = host.varlen_attention(args["q"], args["k"], args["v"], args["cu_seqlens_q"],
                                         args["cu_seqlens_k"], args["max_seqlen_q"], args["max_seqlen_k"],
                                         64 ** -0.5, True, 12, 0, 0.0, True, None, args.get("block_table"),
                                         config=dict(config))
    check(out, args, lse=lse, causal=True, window_size=(12, -1))


def test_a_tma_key_tile_across_cache_blocks_is_refused():
    """sm90 paged specs load a key tile by one bulk copy: the tile must lie in one cache block."""
    spec = host.spec_of(host.AttnVarlenCall(1, 1, 64, 256, 2, 1, 64, "bf16", page_size=64), 90)
    assert spec["tma"]
    assert "does not divide" in host.is_feasible(spec, {"BLOCK_M": 64, "BLOCK_N": 128, "num_warps": 4,
                                                        "num_stages": 2})
    assert host.default_config(spec)["BLOCK_N"] <= 64
