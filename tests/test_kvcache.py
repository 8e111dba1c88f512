"""flash_attn_with_kvcache against the float64 reference (flashcore/reference.py: kvcache_ref).

CPU, Triton interpreter, fp16 and fp32, small shapes (CI runs this on 2 cores). The feature matrix (cache layout
and block size, Sq, GQA group, head_dim, dtype, append, cache_seqlens, mask, softcap, rotary, leftpad, ALiBi,
num_splits, lse) is covered pairwise, not as a cartesian product: every pair of levels of any two features occurs
in at least one case (`pairwise_cases`, checked by a test), in a few dozen calls. Targeted tests follow for the
edges a matrix would not name: empty caches, rows that see no key, splits, unused block-table entries, a decode
loop, strided inputs, other head dims and groups, shared prefix blocks, an unchecked overflow.

Every call runs with poisoned memory: the kernel's own allocations are NaN-filled (an output element or lse row
it forgets to write fails), and every cache slot a call must not read (beyond cache_seqlens, before the left pad,
unused blocks and rows, the slots the append is about to fill) holds NaN, so a read outside the valid range
shows. After the call every cache slot other than the appended ones is bit-identical to before and the appended
ones hold the expected values (`assert_close_kvcache`).
"""
from __future__ import annotations

import itertools
import math
import os
import threading

import pytest
import torch

import flashcore
from flashcore.reference import (apply_rotary, assert_close_kvcache, attention_ref, gather_kvcache, kvcache_ref,
                                 kvcache_slots, kvcache_tolerance)
from poison import poisoned_allocations

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
FP16, FP32 = torch.float16, torch.float32
dtype_ids = {FP16: "fp16", FP32: "fp32"}
# the GPU runs the same cases with `-m gpu_extended` (tests/test_kvcache_gpu.py has the bf16 / large-shape ones)
pytestmark = [] if INTERPRET else [pytest.mark.gpu_extended]


# ---------------------------------------------------------------------------------------------------------------
# building inputs

# layout -> (block_size or None for a contiguous cache, capacity per sequence). Capacities are not multiples of
# the kernels' key tiles, so the last tile of a full cache is partial.
LAYOUTS = {
    "contig": (None, 70),
    "contig_batch_idx": (None, 70),     # contiguous, rows picked by cache_batch_idx from a bigger cache
    "paged1": (1, 70),
    "paged16": (16, 80),
    "paged24": (24, 96),                # a block size that is not a power of two
    "paged64": (64, 128),
}


def rope_tables(seqlen_ro, rotary_dim, dtype, device, base=10000.0):
    """(cos, sin) (seqlen_ro, rotary_dim / 2) in dtype: the usual RoPE angles pos / base^(2i / rotary_dim)."""
    inv_freq = base ** (-torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)
    angles = torch.arange(seqlen_ro, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return angles.cos().to(dtype).to(device), angles.sin().to(dtype).to(device)


def make_caches(layout, batch, heads_kv, head_dim, dtype, device, seqlens, leftpad=None):
    """(k_cache, v_cache, block_table, cache_batch_idx) of a LAYOUTS layout: see make_caches_of."""
    block_size, capacity = LAYOUTS[layout]
    return make_caches_of(batch, capacity, heads_kv, head_dim, dtype, device, seqlens, leftpad, block_size,
                          batch_idx=layout == "contig_batch_idx")


def make_caches_of(batch, capacity, heads_kv, head_dim, dtype, device, seqlens, leftpad=None, block_size=None,
                   batch_idx=False):
    """(k_cache, v_cache, block_table, cache_batch_idx): random keys and values at the positions a call may read,
    leftpad[b] <= p < seqlens[b] of sequence b, and NaN in every other slot of the physical cache.

    block_size: a paged cache of capacity // block_size blocks per sequence, with more blocks than the batch needs,
    handed out in a shuffled order. Else contiguous; batch_idx: the batch's rows, shuffled, out of a cache with
    two rows more (cache_batch_idx).
    """
    block_table = cache_batch_idx = None
    if block_size is not None:
        max_blocks = capacity // block_size
        num_blocks = batch * max_blocks + 5
        block_table = torch.randperm(num_blocks)[: batch * max_blocks].reshape(batch, max_blocks)
        block_table = block_table.to(torch.int32).to(device)
        shape = (num_blocks, block_size, heads_kv, head_dim)
    elif batch_idx:
        cache_batch_idx = torch.randperm(batch + 2)[:batch].to(torch.int32).to(device)
        shape = (batch + 2, capacity, heads_kv, head_dim)
    else:
        shape = (batch, capacity, heads_kv, head_dim)
    k_cache = torch.full(shape, float("nan"), dtype=dtype, device=device)
    v_cache = torch.full(shape, float("nan"), dtype=dtype, device=device)
    positions = torch.arange(capacity, device=device).expand(batch, capacity)
    seqlens_t = torch.as_tensor(seqlens, device=device).reshape(-1, 1).expand(batch, 1)
    start = torch.as_tensor(leftpad if leftpad is not None else 0, device=device).reshape(-1, 1)
    valid = (positions < seqlens_t) & (positions >= start)
    rows, offsets = kvcache_slots(k_cache, positions, cache_batch_idx, block_table)
    k_cache[rows[valid], offsets[valid]] = torch.randn(int(valid.sum()), heads_kv, head_dim, device=device).to(dtype)
    v_cache[rows[valid], offsets[valid]] = torch.randn(int(valid.sum()), heads_kv, head_dim, device=device).to(dtype)
    return k_cache, v_cache, block_table, cache_batch_idx


def call_and_check(q, k_cache, v_cache, *, num_splits=0, return_softmax_lse=True, **kwargs):
    """flash_attn_with_kvcache (poisoned allocations) on the caches, then out, lse and both caches against the
    reference (kwargs: the call's other arguments). Returns (out, lse or None)."""
    k_before, v_before = k_cache.clone(), v_cache.clone()
    with poisoned_allocations():
        res = flashcore.flash_attn_with_kvcache(q, k_cache, v_cache, num_splits=num_splits,
                                                return_softmax_lse=return_softmax_lse, **kwargs)
    if return_softmax_lse:
        assert isinstance(res, tuple) and len(res) == 2
        out, lse = res
    else:
        assert isinstance(res, torch.Tensor), "without return_softmax_lse the result is out alone"
        out, lse = res, None
    assert out.device == q.device
    assert_close_kvcache(out, q, k_before, v_before, k_cache, v_cache, lse=lse, **kwargs)
    return out, lse


def sequence_slots(k_cache, b: int, block_table=None, cache_batch_idx=None):
    """bool (k_cache.shape[0], k_cache.shape[1]): every slot of sequence b's cache (its row, or its blocks)."""
    mask = torch.zeros(k_cache.shape[:2], dtype=torch.bool, device=k_cache.device)
    if block_table is not None:
        mask[block_table[b].long()] = True
    else:
        mask[int(cache_batch_idx[b]) if cache_batch_idx is not None else b] = True
    return mask


def assert_merged(inline: bool) -> None:
    """Every kept plan merged its splits the way the `merge_inline` fixture (conftest.py) asked; a combine kernel
    is a programmatic dependent launch where the GPU has it (sm90)."""
    from flashcore.device import arch, programmatic_launch
    from flashcore.ops.attn_decode import host
    assert host._plans and all((plan.combine is None) == inline for plan in host._plans.values())
    for plan in host._plans.values():
        if plan.combine is not None:
            pdl = plan.device.type == "cuda" and programmatic_launch(arch(plan.device.index or 0))
            assert plan.combine.plan.static.get("launch_pdl", False) == pdl == plan.decode.plan.static["PDL"]


def assert_overflow_contained(out, q, k_before, v_before, k_cache, v_cache, overflowing: int, k, v, cache_seqlens,
                              block_table=None, cache_batch_idx=None, **kwargs):
    """After an unchecked call (inside a CUDA graph, or $FLASHCORE_KV_CHECKS=0) in which sequence `overflowing`
    has more tokens than its cache holds: no slot outside that sequence's own cache changed except the other
    sequences' appended slots, which hold their new tokens, and the other sequences' outputs are right. (What
    the overflowing sequence gets is unspecified.)"""
    others = [b for b in range(q.shape[0]) if b != overflowing]
    own = sequence_slots(k_cache, overflowing, block_table, cache_batch_idx)
    k_allowed, v_allowed = k_before.clone(), v_before.clone()
    k_allowed[own], v_allowed[own] = k_cache[own], v_cache[own]
    assert_close_kvcache(out[others], q[others], k_allowed, v_allowed, k_cache, v_cache, k=k[others], v=v[others],
                         cache_seqlens=cache_seqlens[others],
                         block_table=None if block_table is None else block_table[others],
                         cache_batch_idx=(torch.tensor(others, dtype=torch.int32, device=q.device)
                                          if cache_batch_idx is None and block_table is None
                                          else None if cache_batch_idx is None else cache_batch_idx[others]),
                         **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# the pairwise matrix

FACTORS = {
    "layout": list(LAYOUTS),
    "rotary": ["none", "gptj", "neox", "gptj_half", "neox_half"],     # _half: rotary_dim = head_dim / 2
    "mask": ["none", "causal", "window_left", "window_both", "causal_window"],
    "head_dim": [128, 64, 96],
    "group": [4, 1, 8],
    "seqlens": ["ragged_with_0", "ragged", "int"],
    "alibi": ["none", "per_head", "per_batch_head"],
    "num_splits": [3, 0, 1],
    "new": [0, 1, "sq"],                # tokens appended: none, one, as many as queries
    "dtype": [FP16, FP32],
    "seqlen_q": [1, 4],
    "softcap": [0.0, 20.0],
    "leftpad": [False, True],
    "lse": [True, False],
}


def allowed(case: dict) -> bool:
    """The contract's constraints on a (partial) case: rotary needs an append."""
    return not (case.get("rotary", "none") != "none" and case.get("new", 1) == 0)


def pairwise_cases(factors: dict, allowed) -> list[dict]:
    """A small set of cases covering every allowed pair of levels of any two factors (greedy, deterministic)."""
    names = list(factors)
    uncovered = {(a, x, b, y) for a, b in itertools.combinations(names, 2)
                 for x in factors[a] for y in factors[b] if allowed({a: x, b: y})}
    cases = []
    while uncovered:
        a, x, b, y = min(uncovered, key=lambda p: (names.index(p[0]), names.index(p[2]), str(p[1]), str(p[3])))
        case = {a: x, b: y}
        for name in names:
            if name in case:
                continue
            def gain(level):
                trial = {**case, name: level}
                if not allowed(trial):
                    return -1
                return sum((n, trial[n], name, level) in uncovered or (name, level, n, trial[n]) in uncovered
                           for n in case)
            case[name] = max(factors[name], key=gain)          # first best level: deterministic
        case = {n: case[n] for n in names}
        uncovered -= {(a, case[a], b, case[b]) for a, b in itertools.combinations(names, 2)}
        cases.append(case)
    return cases


CASES = pairwise_cases(FACTORS, allowed)


def case_id(case: dict) -> str:
    parts = [case["layout"], dtype_ids[case["dtype"]], f"d{case['head_dim']}", f"g{case['group']}",
             f"sq{case['seqlen_q']}", f"new{case['new']}", case["seqlens"], case["mask"], f"rot_{case['rotary']}",
             f"splits{case['num_splits']}"]
    parts += [flag for flag in ("softcap", "leftpad") if case[flag]]
    parts += [] if case["alibi"] == "none" else [f"alibi_{case['alibi']}"]
    parts += [] if case["lse"] else ["no_lse"]
    return "-".join(parts)


def test_pairwise_cases_cover_every_allowed_pair():
    covered = {(a, case[a], b, case[b]) for case in CASES for a, b in itertools.combinations(FACTORS, 2)}
    for a, b in itertools.combinations(FACTORS, 2):
        for x, y in itertools.product(FACTORS[a], FACTORS[b]):
            assert (a, x, b, y) in covered or not allowed({a: x, b: y}), (a, x, b, y)
    assert all(allowed(case) for case in CASES)
    assert len(CASES) <= 45, len(CASES)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_matrix(case, device):
    dtype, head_dim, seqlen_q = case["dtype"], case["head_dim"], case["seqlen_q"]
    batch, capacity = 3, LAYOUTS[case["layout"]][1]
    heads_kv = 1 if case["group"] == 8 else 2
    heads_q = heads_kv * case["group"]
    seqlen_new = {0: 0, 1: 1, "sq": seqlen_q}[case["new"]]
    full = capacity - seqlen_new                     # cache full after the append
    seqlens = {"ragged_with_0": [0, capacity // 2 + 3, full], "ragged": [7, full, 2],
               "int": [capacity // 2 - 1] * batch}[case["seqlens"]]
    leftpad = [min(seqlens[0], 2), seqlens[1] // 3, seqlens[2]] if case["leftpad"] else None
    k_cache, v_cache, block_table, cache_batch_idx = make_caches(case["layout"], batch, heads_kv, head_dim, dtype,
                                                                 device, seqlens, leftpad)
    q_scale = 3.0 if case["softcap"] else 1.0        # scores large enough for the cap to bend them
    q = (torch.randn(batch, seqlen_q, heads_q, head_dim, device=device) * q_scale).to(dtype)
    kwargs = dict(block_table=block_table, cache_batch_idx=cache_batch_idx, softcap=case["softcap"])
    kwargs["cache_seqlens"] = (seqlens[0] if case["seqlens"] == "int"
                               else torch.tensor(seqlens, dtype=torch.int32, device=device))
    if leftpad is not None:
        kwargs["cache_leftpad"] = torch.tensor(leftpad, dtype=torch.int32, device=device)
    if seqlen_new:
        kwargs["k"] = torch.randn(batch, seqlen_new, heads_kv, head_dim, device=device).to(dtype)
        kwargs["v"] = torch.randn(batch, seqlen_new, heads_kv, head_dim, device=device).to(dtype)
    kwargs.update({"none": {}, "causal": dict(causal=True), "window_left": dict(window_size=(9, -1)),
                   "window_both": dict(window_size=(6, 2)),
                   "causal_window": dict(causal=True, window_size=(12, -1))}[case["mask"]])
    if case["rotary"] != "none":
        rotary_dim = head_dim // 2 if case["rotary"].endswith("_half") else head_dim
        kwargs["rotary_cos"], kwargs["rotary_sin"] = rope_tables(capacity + seqlen_q, rotary_dim, dtype, device)
        kwargs["rotary_interleaved"] = case["rotary"].startswith("gptj")
    if case["alibi"] != "none":
        shape = (heads_q,) if case["alibi"] == "per_head" else (batch, heads_q)
        kwargs["alibi_slopes"] = torch.rand(shape, device=device) * 0.3
    call_and_check(q, k_cache, v_cache, num_splits=case["num_splits"], return_softmax_lse=case["lse"], **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# the reference itself (cheap: no kernel)

def test_reference_full_cache_is_attention_ref():
    """cache_seqlens=None, no append: attention over the whole cache, as attention_ref computes it."""
    q = torch.randn(2, 3, 4, 32, dtype=torch.float64)
    k_cache, v_cache = torch.randn(2, 2, 20, 2, 32, dtype=torch.float64).unbind(0)
    out, lse, k_after, v_after = kvcache_ref(q, k_cache, v_cache, causal=True, softcap=5.0)
    ref_out, ref_lse = attention_ref(q, k_cache, v_cache, causal=True, softcap=5.0)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
    torch.testing.assert_close(lse, ref_lse, rtol=0, atol=0)
    assert torch.equal(k_after, k_cache) and torch.equal(v_after, v_cache)


def test_reference_paged_equals_contiguous_and_leaves_inputs_alone():
    """The same tokens in a shuffled paged cache and in a contiguous one give the same answer and caches."""
    batch, capacity, block = 2, 48, 16
    seqlens = torch.tensor([5, 40], dtype=torch.int32)
    k_contig, v_contig = torch.randn(2, batch, capacity, 2, 32, dtype=torch.float64).unbind(0)
    table = torch.randperm(7)[:6].reshape(batch, 3).to(torch.int32)
    k_paged, v_paged = torch.zeros(2, 7, block, 2, 32, dtype=torch.float64).unbind(0)
    positions = torch.arange(capacity).expand(batch, capacity)
    rows, offsets = kvcache_slots(k_paged, positions, block_table=table)
    k_paged[rows, offsets], v_paged[rows, offsets] = k_contig, v_contig
    assert torch.equal(gather_kvcache(k_paged, table), k_contig)
    q = torch.randn(batch, 2, 4, 32, dtype=torch.float64)
    k, v = torch.randn(2, batch, 2, 2, 32, dtype=torch.float64).unbind(0)
    cos, sin = rope_tables(capacity, 16, torch.float64, "cpu")
    kw = dict(k=k, v=v, cache_seqlens=seqlens, rotary_cos=cos, rotary_sin=sin, causal=True, rotary_interleaved=False)
    snapshot = [t.clone() for t in (q, k_paged, v_paged, k, v)]
    contig = kvcache_ref(q, k_contig, v_contig, **kw)
    paged = kvcache_ref(q, k_paged, v_paged, block_table=table, **kw)
    torch.testing.assert_close(paged[0], contig[0], rtol=0, atol=0)
    assert torch.equal(gather_kvcache(paged[2], table), contig[2])
    assert torch.equal(gather_kvcache(paged[3], table), contig[3])
    assert all(torch.equal(a, b) for a, b in zip(snapshot, (q, k_paged, v_paged, k, v))), "inputs modified"


@pytest.mark.parametrize("interleaved", [True, False], ids=["gptj", "neox"])
def test_reference_rotary_is_complex_rotation(interleaved):
    """apply_rotary multiplies each pair, read as a complex number, by e^(i angle); features past rotary_dim stay."""
    x = torch.randn(1, 3, 2, 16, dtype=torch.float64)
    cos, sin = rope_tables(10, 8, torch.float64, "cpu")
    positions = torch.tensor([[0, 4, 9]])
    got = apply_rotary(x, cos, sin, positions, interleaved)
    if interleaved:
        pairs = torch.view_as_complex(x[..., :8].reshape(1, 3, 2, 4, 2).contiguous())
    else:
        pairs = torch.complex(x[..., :4], x[..., 4:8])
    rot = pairs * torch.polar(torch.ones_like(cos), torch.atan2(sin, cos))[positions][:, :, None]
    want = torch.view_as_real(rot).flatten(-2) if interleaved else torch.cat((rot.real, rot.imag), -1)
    torch.testing.assert_close(got[..., :8], want, rtol=1e-12, atol=1e-12)
    assert torch.equal(got[..., 8:], x[..., 8:])


def test_reference_rotary_q_positions():
    """q rows rotate at consecutive positions when causal or windowed, all at cache_seqlens otherwise."""
    q = torch.randn(1, 3, 1, 8, dtype=torch.float64)
    k_cache = torch.randn(1, 20, 1, 8, dtype=torch.float64)
    k = torch.randn(1, 3, 1, 8, dtype=torch.float64)
    cos, sin = rope_tables(20, 8, torch.float64, "cpu")
    kw = dict(k=k, v=k, rotary_cos=cos, rotary_sin=sin, cache_seqlens=5)
    _, _, k_after, v_after = kvcache_ref(q, k_cache, k_cache, **kw)        # the appended cache, whatever the mask
    for extra, positions in ((dict(causal=True), [[5, 6, 7]]), (dict(window_size=(4, -1)), [[5, 6, 7]]),
                             ({}, [[5, 5, 5]])):
        out = kvcache_ref(q, k_cache, k_cache, **kw, **extra)[0]
        q_rot = apply_rotary(q, cos, sin, torch.tensor(positions), True)
        want = attention_ref(q_rot, k_after[:, :8], v_after[:, :8], **extra)[0]
        torch.testing.assert_close(out, want, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [FP16, FP32], ids=dtype_ids.get)
def test_tolerance_rejects_near_misses(dtype):
    """The tolerance is tight enough to catch one key too many (the appended slot read before it is written: the
    key after it), q rotated one position off, and query heads reading the wrong kv head."""
    batch, heads_kv, group, head_dim = 2, 2, 4, 64
    seqlens = torch.tensor([30, 45], dtype=torch.int32)
    q = torch.randn(batch, 1, heads_kv * group, head_dim).to(dtype)
    k_cache, v_cache = torch.randn(2, batch, 64, heads_kv, head_dim).to(dtype).unbind(0)
    k, v = torch.randn(2, batch, 1, heads_kv, head_dim).to(dtype).unbind(0)
    cos, sin = rope_tables(64, head_dim, dtype, "cpu")
    kw = dict(k=k, v=v, cache_seqlens=seqlens, rotary_cos=cos, rotary_sin=sin)
    atol = kvcache_tolerance(q, k_cache, v_cache, **kw)
    right = kvcache_ref(q, k_cache, v_cache, **kw)[0]
    no_append = {**kw, "k": None, "v": None, "rotary_cos": None, "rotary_sin": None}
    one_more_key = kvcache_ref(q, k_cache, v_cache, **{**no_append, "cache_seqlens": seqlens + 2})[0]
    # rotating q once more by position 1's angle puts it at position cache_seqlens + 1 (RoPE angles are linear)
    q_next = apply_rotary(q, cos, sin, torch.ones(batch, 1, dtype=torch.int64), True)
    q_one_position_off = kvcache_ref(q_next, k_cache, v_cache, **kw)[0]
    other_kv_head = kvcache_ref(q, k_cache.flip(2), v_cache.flip(2), **{**kw, "k": k.flip(2), "v": v.flip(2)})[0]
    for name, wrong in (("one key more", one_more_key), ("q rotated one position off", q_one_position_off),
                        ("query heads reading the other kv head", other_kv_head)):
        assert (wrong - right).abs().max().item() > atol, (name, atol)


# ---------------------------------------------------------------------------------------------------------------
# edges

@pytest.mark.parametrize("layout", ["contig", "paged16"])
def test_empty_caches_without_append_see_nothing(layout, device):
    """cache_seqlens 0 and nothing appended: no key, out 0 and lse -inf (not NaN)."""
    k_cache, v_cache, table, _ = make_caches(layout, 2, 2, 64, FP16, device, [0, 0])
    q = torch.randn(2, 4, 4, 64, device=device).to(FP16)
    out, lse = call_and_check(q, k_cache, v_cache, cache_seqlens=torch.zeros(2, dtype=torch.int32, device=device),
                              block_table=table, num_splits=3)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()


@pytest.mark.parametrize("layout", ["contig", "paged24"])
def test_rows_that_see_no_key(layout, device):
    """Causal with more queries than keys: the first rows see nothing (out 0, lse -inf), the rest are exact.
    Sequence 0 has 1 key (the appended one), sequence 1 has 3, leftpad hides all but the new one in sequence 2."""
    seqlens, leftpad = [0, 2, 10], [0, 0, 10]
    k_cache, v_cache, table, _ = make_caches(layout, 3, 1, 64, FP32, device, seqlens, leftpad)
    q = torch.randn(3, 4, 4, 64, device=device)
    k, v = torch.randn(2, 3, 1, 1, 64, device=device).unbind(0)
    out, lse = call_and_check(q, k_cache, v_cache, k=k, v=v, block_table=table, causal=True,
                              cache_seqlens=torch.tensor(seqlens, dtype=torch.int32, device=device),
                              cache_leftpad=torch.tensor(leftpad, dtype=torch.int32, device=device))
    assert torch.equal(out[0, :3], torch.zeros_like(out[0, :3])) and torch.isneginf(lse[0, :, :3]).all()
    assert torch.equal(out[1, :1], torch.zeros_like(out[1, :1])) and torch.isneginf(lse[1, :, :1]).all()
    assert torch.equal(out[2, :3], torch.zeros_like(out[2, :3])) and torch.isneginf(lse[2, :, :3]).all()


def test_cache_seqlens_none_attends_the_whole_capacity(device):
    k_cache, v_cache, table, _ = make_caches("paged16", 2, 2, 64, FP16, device, [80, 80])
    q = torch.randn(2, 1, 8, 64, device=device).to(FP16)
    call_and_check(q, k_cache, v_cache, block_table=table, num_splits=2)


@pytest.mark.parametrize("num_splits", [2, 200])
def test_num_splits_honoured_and_agree(num_splits, device):
    """Any split count, more splits than key tiles included (empty splits), gives the reference's answer, and
    twice the same call gives the same bits."""
    seqlens = [1, 120, 57]
    k_cache, v_cache, table, _ = make_caches("paged64", 3, 2, 64, FP16, device, seqlens)
    q = torch.randn(3, 1, 8, 64, device=device).to(FP16)
    kw = dict(cache_seqlens=torch.tensor(seqlens, dtype=torch.int32, device=device), block_table=table)
    out, lse = call_and_check(q, k_cache, v_cache, num_splits=num_splits, **kw)
    again, lse_again = flashcore.flash_attn_with_kvcache(q, k_cache, v_cache, num_splits=num_splits,
                                                         return_softmax_lse=True, **kw)
    assert torch.equal(out, again) and torch.equal(lse, lse_again), "the decode is deterministic"


def test_split_scratch_is_kept_per_stream_and_thread(device):
    """Eager calls keep one scratch for split partials (fp32) and merge tickets (int32 zeros) per (device, stream,
    thread), grown when a call needs more; a smaller call reuses a bigger buffer; another thread gets its own."""
    from flashcore.ops.attn_decode.host import split_scratch
    dev, stream = torch.device(device), object()
    first, no_tickets = split_scratch(100, 0, dev, stream, False)
    assert first.dtype == torch.float32 and no_tickets is None
    again, tickets = split_scratch(60, 8, dev, stream, False)
    assert again is first and tickets.dtype == torch.int32 and not tickets.any()
    grown, more_tickets = split_scratch(200, 16, dev, stream, False)
    assert grown.numel() == 200 and more_tickets.numel() == 16 and not more_tickets.any()
    assert split_scratch(100, 4, dev, stream, False) == (grown, more_tickets)
    assert split_scratch(100, 0, dev, object(), False)[0] is not grown, "another stream, another buffer"
    other = []
    thread = threading.Thread(target=lambda: other.append(split_scratch(100, 0, dev, stream, False)[0]))
    thread.start()
    thread.join()
    assert other[0] is not grown, "another thread, another buffer"


@pytest.mark.parametrize("head_dim", [64, 80])
def test_split_merge_inline_or_by_the_combine_kernel(merge_inline, head_dim, device):
    """Both merges of the splits (the last split of each (sequence, kv head), or the combine kernel, whose
    programs take 32 columns of the head dim each: 80 in three, the last one masked) give the reference's answer
    over empty splits, 16 query rows (4 tokens x GQA 4) and a sequence with no key; the inline merge leaves its
    tickets at 0 for the next call, which runs the kept plan."""
    from flashcore.ops.attn_decode import host
    seqlens = [0, 75, 33]
    k_cache, v_cache, table, _ = make_caches("paged16", 3, 2, head_dim, FP16, device, seqlens)
    q = torch.randn(3, 4, 8, head_dim, device=device).to(FP16)
    kw = dict(cache_seqlens=torch.tensor(seqlens, dtype=torch.int32, device=device), block_table=table,
              num_splits=4)
    for _ in range(2):
        call_and_check(q, k_cache, v_cache, **kw)
        assert_merged(merge_inline)
        assert [plan.counters for plan in host._plans.values()] == [6 if merge_inline else 0]
        if merge_inline:
            (_, tickets), = host._scratch.values()
            assert not tickets.any(), "the merging splits reset their tickets"


def test_split_calls_of_several_sizes_share_the_scratch(device):
    """Split calls of several sizes one after the other on one thread: a big call's stale partials stay in the
    scratch the smaller calls reuse, and every output matches the reference. (Two threads at once are a GPU test:
    the interpreter itself is not thread-safe.)"""
    from flashcore.ops.attn_decode import host
    host._scratch.clear()
    for batch, num_splits in ((3, 8), (2, 2), (3, 4), (1, 8)) * 2:     # (the second round runs kept plans)
        gen = torch.Generator().manual_seed(batch * 10 + num_splits)
        seqlens = torch.randint(1, 81, (batch,), generator=gen).tolist()          # (paged16 holds 80)
        k_cache, v_cache, table, _ = make_caches("paged16", batch, 2, 64, FP16, device, seqlens)
        q = torch.randn(batch, 1, 8, 64, generator=gen).to(device=device, dtype=FP16)
        kw = dict(cache_seqlens=torch.tensor(seqlens, dtype=torch.int32, device=device), block_table=table)
        out, lse = flashcore.flash_attn_with_kvcache(q, k_cache, v_cache, num_splits=num_splits,
                                                     return_softmax_lse=True, **kw)
        assert_close_kvcache(out, q, k_cache, v_cache, k_cache, v_cache, lse=lse, **kw)
    assert len(host._scratch) == 1, "the kept plans' calls used this thread's scratch"


def test_unused_block_table_entries_are_not_read(device):
    """Entries past the blocks a sequence uses may be anything (vLLM pads tables with -1 or stale ids): they are
    neither checked nor read."""
    seqlens = [3, 20]
    k_cache, v_cache, table, _ = make_caches("paged16", 2, 2, 64, FP16, device, seqlens)
    num_blocks = k_cache.shape[0]
    table[0, 1:] = -1                     # sequence 0 uses block 0 only, even after its 1-token append
    table[1, 2:] = num_blocks + 1000      # sequence 1 uses blocks 0 and 1
    q = torch.randn(2, 1, 4, 64, device=device).to(FP16)
    k, v = torch.randn(2, 2, 1, 2, 64, device=device).to(FP16).unbind(0)
    call_and_check(q, k_cache, v_cache, k=k, v=v, block_table=table, num_splits=3,
                   cache_seqlens=torch.tensor(seqlens, dtype=torch.int32, device=device))


@pytest.mark.parametrize("block_size", [1, 2])
def test_splits_longer_than_one_table_chunk(block_size, device, kv_checks):
    """A paged decode program loads its split's table entries in chunks (host.table_chunk: 256 entries, at most 255
    keys of blocks of 1): one split over 700 keys spans several chunks, from a leftpad inside the first one; a bad
    entry in a chunk before the last fails that sequence alone (NaN) and the next call names it (the kernels' own
    check: deferred, as on a GPU)."""
    kv_checks("deferred")
    seqlens, leftpad = [700, 389], [5, 0]
    k_cache, v_cache, table, _ = make_caches_of(2, 702, 2, 64, FP16, device, seqlens, leftpad, block_size)
    q = torch.randn(2, 1, 4, 64, device=device).to(FP16)
    kw = dict(cache_seqlens=torch.tensor(seqlens, dtype=torch.int32, device=device), block_table=table,
              cache_leftpad=torch.tensor(leftpad, dtype=torch.int32, device=device), num_splits=1)
    call_and_check(q, k_cache, v_cache, **kw)
    column = 250 // block_size
    table[0, column] = k_cache.shape[0]
    out = flashcore.flash_attn_with_kvcache(q, k_cache, v_cache, **kw)
    assert torch.isnan(out[0].float()).all() and not torch.isnan(out[1].float()).any()
    with pytest.raises(ValueError, match=rf"block_table\[0, {column}\] = {k_cache.shape[0]}"):
        flashcore.flash_attn_with_kvcache(q, k_cache, v_cache, **kw)


@pytest.mark.parametrize("layout", ["paged16", "contig_batch_idx"])
def test_decode_loop(layout, device):
    """Six decode steps, one token appended per step with rotary, sequence 0 crossing a block boundary (13 -> 19)
    and sequence 1 starting empty: each step's output and caches match the reference of the caches as they are."""
    seqlens = torch.tensor([13, 0], dtype=torch.int32, device=device)
    k_cache, v_cache, table, batch_idx = make_caches(layout, 2, 2, 64, FP16, device, seqlens.tolist())
    cos, sin = rope_tables(80, 64, FP16, device)
    for _ in range(6):
        q = torch.randn(2, 1, 4, 64, device=device).to(FP16)
        k, v = torch.randn(2, 2, 1, 2, 64, device=device).to(FP16).unbind(0)
        call_and_check(q, k_cache, v_cache, k=k, v=v, rotary_cos=cos, rotary_sin=sin, cache_seqlens=seqlens,
                       block_table=table, cache_batch_idx=batch_idx, causal=True)
        seqlens += 1


def test_rotary_tables_with_different_row_strides(device):
    """rotary_cos contiguous and rotary_sin a column slice of a wider table (another row stride): both rotate as
    the reference does (the kernel steps both tables by one stride: the API copies such a pair)."""
    seqlens = torch.tensor([5, 17], dtype=torch.int32, device=device)
    k_cache, v_cache, table, batch_idx = make_caches("contig", 2, 2, 64, FP16, device, seqlens.tolist())
    cos, sin = rope_tables(80, 32, FP16, device)
    wide_sin = torch.cat([sin, torch.full_like(sin, float("nan"))], dim=1)[:, :16]
    assert wide_sin.stride(0) != cos.stride(0) and torch.equal(wide_sin, sin)
    q = torch.randn(2, 3, 4, 64, device=device).to(FP16)
    k, v = torch.randn(2, 2, 3, 2, 64, device=device).to(FP16).unbind(0)
    call_and_check(q, k_cache, v_cache, k=k, v=v, rotary_cos=cos, rotary_sin=wide_sin, rotary_interleaved=False,
                   cache_seqlens=seqlens, causal=True)


def test_strided_caches_and_inputs(device):
    """k_cache / v_cache as views of one packed (B, S, 2, Hkv, D) tensor, and q, k, v as head slices of one qkv
    projection output (B, 1, Hq + 2 Hkv, D), as a model hands them over: no unit strides except D's, read and
    written through their strides."""
    batch, capacity, heads_q, heads_kv, head_dim = 2, 70, 8, 2, 64
    seqlens = [30, 69]
    kv = torch.randn(batch, capacity, 2, heads_kv, head_dim, device=device).to(FP16)
    k_cache, v_cache = kv[:, :, 0], kv[:, :, 1]
    qkv = torch.randn(batch, 1, heads_q + 2 * heads_kv, head_dim, device=device).to(FP16)
    q, k_new, v_new = qkv.split([heads_q, heads_kv, heads_kv], dim=2)
    call_and_check(q, k_cache, v_cache, k=k_new, v=v_new, window_size=(20, 0),
                   cache_seqlens=torch.tensor(seqlens, dtype=torch.int32, device=device))


@pytest.mark.parametrize("head_dim,heads_q,heads_kv,seqlen_q,layout", [
    (80, 28, 4, 1, "paged16"),          # group 7 (Qwen-style 28 / 4), a head dim that is not a power of two
    (256, 4, 2, 2, "contig"),           # the largest head dim
    (16, 16, 2, 16, "paged24"),         # speculative decoding's Sq 16 with group 8: 128 query rows per kv head
], ids=["d80-g7", "d256-g2", "d16-g8-sq16"])
def test_other_head_dims_groups_and_query_lengths(head_dim, heads_q, heads_kv, seqlen_q, layout, device):
    seqlens = [0, 40]
    k_cache, v_cache, table, _ = make_caches(layout, 2, heads_kv, head_dim, FP16, device, seqlens)
    q = torch.randn(2, seqlen_q, heads_q, head_dim, device=device).to(FP16)
    k, v = torch.randn(2, 2, seqlen_q, heads_kv, head_dim, device=device).to(FP16).unbind(0)
    call_and_check(q, k_cache, v_cache, k=k, v=v, block_table=table, causal=True,
                   cache_seqlens=torch.tensor(seqlens, dtype=torch.int32, device=device))


def test_shared_prefix_blocks(device):
    """Forked sequences share their prefix's full blocks (one block id in several table rows; vLLM's prefix
    caching): each reads the shared keys and appends into its own last block only."""
    block, heads_kv, head_dim = 16, 2, 64
    # three sequences: a 32-token shared prefix in blocks 0 and 1, then each its own block (2, 3, 5); 4, 6, 7 unused
    table = torch.tensor([[0, 1, 2, 7], [0, 1, 3, 6], [0, 1, 5, 4]], dtype=torch.int32, device=device)
    k_cache = torch.full((8, block, heads_kv, head_dim), float("nan"), device=device).to(FP16)
    v_cache = k_cache.clone()
    for blk, used in ((0, block), (1, block), (2, 8), (3, 1), (5, 3)):      # NaN past each sequence's length
        k_cache[blk, :used] = torch.randn(used, heads_kv, head_dim, device=device).to(FP16)
        v_cache[blk, :used] = torch.randn(used, heads_kv, head_dim, device=device).to(FP16)
    seqlens = torch.tensor([40, 33, 35], dtype=torch.int32, device=device)
    q = torch.randn(3, 1, 8, head_dim, device=device).to(FP16)
    k, v = torch.randn(2, 3, 1, heads_kv, head_dim, device=device).to(FP16).unbind(0)
    call_and_check(q, k_cache, v_cache, k=k, v=v, block_table=table, cache_seqlens=seqlens, num_splits=2)


def test_softmax_scale(device):
    k_cache, v_cache, _, _ = make_caches("contig", 2, 2, 96, FP32, device, [40, 9])
    q = torch.randn(2, 4, 4, 96, device=device)
    call_and_check(q, k_cache, v_cache, softmax_scale=0.3, causal=True,
                   cache_seqlens=torch.tensor([40, 9], dtype=torch.int32, device=device))


def test_nan_poison_reaches_the_reference_check(device):
    """The poison is live: a cache slot inside the valid range set to NaN makes the reference output NaN (so the
    NaN slots outside it, which the reference never reads, are what a wrong kernel would pick up)."""
    k_cache, v_cache, _, _ = make_caches("contig", 1, 1, 64, FP32, device, [10])
    assert torch.isnan(v_cache[0, 10:]).all() and not torch.isnan(v_cache[0, :10]).any()
    q = torch.randn(1, 1, 1, 64, device=device)
    assert not torch.isnan(kvcache_ref(q, k_cache, v_cache, cache_seqlens=10)[0]).any()
    assert torch.isnan(kvcache_ref(q, k_cache, v_cache, cache_seqlens=11)[0]).all()
    assert math.isnan(kvcache_ref(q, k_cache, v_cache, cache_seqlens=11)[1].item())


@pytest.mark.parametrize("layout", ["contig", "paged16"])
def test_unchecked_overflow_stays_in_the_sequence_cache(layout, device, kv_checks):
    """Without value checks (as inside a CUDA graph), a sequence appending past its capacity writes nothing outside
    its own cache: in memory, position `capacity` of row / block-table row 1 is the start of sequence 2's."""
    kv_checks("0")
    capacity = LAYOUTS[layout][1]
    seqlens = [5, capacity - 1, 30]
    k_cache, v_cache, table, _ = make_caches(layout, 3, 2, 64, FP16, device, seqlens)
    q = torch.randn(3, 1, 4, 64, device=device).to(FP16)
    k, v = torch.randn(2, 3, 2, 2, 64, device=device).to(FP16).unbind(0)
    cache_seqlens = torch.tensor(seqlens, dtype=torch.int32, device=device)
    k_before, v_before = k_cache.clone(), v_cache.clone()
    with poisoned_allocations():
        out = flashcore.flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=cache_seqlens,
                                                block_table=table, num_splits=2)
    assert_overflow_contained(out, q, k_before, v_before, k_cache, v_cache, 1, k, v, cache_seqlens,
                              block_table=table)
