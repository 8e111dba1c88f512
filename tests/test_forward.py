"""Forward correctness against the float64 reference (tests/reference.py).

Runs on the CPU under the Triton interpreter (conftest sets TRITON_INTERPRET=1 when there is no GPU), in fp16
and fp32; on a GPU machine the same tests run the real kernels (plus bf16). Shapes are small: the interpreter
executes each program of the grid in Python.

Every test draws fresh random inputs (conftest seeds per test id), and every kernel call runs with torch.empty
poisoned (NaN-filled), so an output element or lse row the kernel forgets to write fails the comparison.
"""
from __future__ import annotations

import math
import os

import pytest
import torch

import flashcore
from flashcore import dispatch
from flashcore.ops.attn_fwd.host import attention_forward, default_config, make_spec
from flashcore.reference import assert_close_attention, attention_ref, tolerance
from poison import poisoned_allocations

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
# The interpreter's tl.dot is wrong for bf16 (Triton 3.6 / 3.9): bf16 only on the GPU.
DTYPES = [torch.float16, torch.float32] if INTERPRET else [torch.float16, torch.bfloat16, torch.float32]
dtype_ids = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
# On a GPU machine (no TRITON_INTERPRET) these same tests run the real kernels, bf16 included, when selected with
# `-m gpu_extended` (hundreds of compiles: longer than the `-m gpu` suite; split with -k if needed).
pytestmark = [] if INTERPRET else [pytest.mark.gpu_extended]


# ---------------------------------------------------------------------------------------------------------------
# helpers

def make_qkv(batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim, dtype, device, scale=1.0):
    q = (torch.randn(batch, seqlen_q, heads_q, head_dim, device=device) * scale).to(dtype)
    k = (torch.randn(batch, seqlen_k, heads_kv, head_dim, device=device) * scale).to(dtype)
    v = torch.randn(batch, seqlen_k, heads_kv, head_dim, device=device).to(dtype)
    return q, k, v


def run_and_check(q, k, v, *, return_lse=True, factor=3.0, **kwargs):
    """flash_attn_func with poisoned allocations, then every row and the lse against the reference."""
    with poisoned_allocations():
        res = flashcore.flash_attn_func(q, k, v, return_lse=return_lse, **kwargs)
    out, lse = res if return_lse else (res, None)
    assert out.is_contiguous()
    assert out.device == q.device
    assert_close_attention(out, q, k, v, lse=lse, factor=factor, **kwargs)
    return out, lse


def forward_with_config(q, k, v, config, softmax_scale=None, causal=False, window=(-1, -1), softcap=0.0,
                        return_lse=True):
    """attention_forward with an explicit tile config (poisoned allocations), as the tuner calls it."""
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    left, right = window
    if causal:
        right = 0
    with poisoned_allocations():
        return attention_forward(q, k, v, scale, causal, left, right, softcap, return_lse, config=dict(config))


# ---------------------------------------------------------------------------------------------------------------
# the helpers themselves

def test_poisoned_allocations_poison():
    with poisoned_allocations():
        assert torch.isnan(torch.empty(4, 3)).all()
        assert torch.isnan(torch.empty((2,), dtype=torch.float16)).all()
        assert torch.isnan(torch.empty_like(torch.zeros(2, 2))).all()
        assert torch.empty(3, dtype=torch.int32).shape == (3,)
    import poison
    assert torch.empty is poison._real_empty and torch.empty_like is poison._real_empty_like


def test_reference_matches_sdpa():
    """The float64 reference agrees with PyTorch's SDPA where both are defined (square causal, no window)."""
    q, k, v = make_qkv(2, 37, 37, 4, 4, 32, torch.float64, "cpu")
    for causal in (False, True):
        ref, _ = attention_ref(q, k, v, causal=causal)
        sdpa = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal).transpose(1, 2)
        torch.testing.assert_close(ref, sdpa, rtol=1e-10, atol=1e-10)


def test_reference_empty_rows_and_window():
    q, k, v = make_qkv(1, 6, 3, 1, 1, 16, torch.float64, "cpu")
    out, lse = attention_ref(q, k, v, causal=True)
    # Sq - Sk = 3 rows see nothing; row 3 sees key 0 only
    assert torch.equal(out[:, :3], torch.zeros_like(out[:, :3]))
    assert torch.isneginf(lse[..., :3]).all() and torch.isfinite(lse[..., 3:]).all()
    torch.testing.assert_close(out[0, 3, 0], v[0, 0, 0])
    out, _ = attention_ref(q, k, v, window_size=(0, 0))    # row i (pos i - 3) sees only key i - 3
    torch.testing.assert_close(out[0, 3:, 0], v[0, :, 0])


# ---------------------------------------------------------------------------------------------------------------
# head dims

@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_ids.get)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("head_dim", [64, 80, 96, 128])
def test_head_dims(head_dim, causal, dtype, device):
    q, k, v = make_qkv(2, 70, 70, 2, 2, head_dim, dtype, device)
    run_and_check(q, k, v, causal=causal)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_ids.get)
@pytest.mark.parametrize("head_dim", [16, 24, 32, 40, 192, 256])
def test_head_dims_small_shapes(head_dim, dtype, device):
    q, k, v = make_qkv(1, 19, 41, 2, 1, head_dim, dtype, device)
    run_and_check(q, k, v, causal=True)
    run_and_check(q, k, v, causal=False)


# ---------------------------------------------------------------------------------------------------------------
# sequence lengths, causal alignment

@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_ids.get)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("seqlen_q,seqlen_k", [
    (64, 200),     # Sq < Sk: bottom-right alignment, every row sees something
    (200, 64),     # Sq > Sk: with causal, the first 136 rows see nothing (out 0, lse -inf)
    (33, 100),
    (100, 33),
    (1, 150),      # decode-like
    (150, 1),
    (48, 48),
])
def test_seqlen_q_ne_k(seqlen_q, seqlen_k, causal, dtype, device):
    q, k, v = make_qkv(1, seqlen_q, seqlen_k, 2, 2, 64, dtype, device)
    out, lse = run_and_check(q, k, v, causal=causal)
    if causal and seqlen_q > seqlen_k:
        blind = seqlen_q - seqlen_k
        assert torch.equal(out[:, :blind], torch.zeros_like(out[:, :blind])), "rows that see no key must be 0"
        assert torch.isneginf(lse[..., :blind]).all()
        assert torch.isfinite(lse[..., blind:]).all()


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("seqlen", [1, 2, 15, 16, 17, 31, 32, 33, 257])
def test_seqlens(seqlen, causal, device):
    heads = 1 if seqlen > 100 else 2
    q, k, v = make_qkv(2, seqlen, seqlen, heads, heads, 64, torch.float16, device)
    run_and_check(q, k, v, causal=causal)


def test_seqlen_257_fp32_gqa_window(device):
    q, k, v = make_qkv(1, 257, 257, 2, 1, 80, torch.float32, device)
    run_and_check(q, k, v, causal=True, window_size=(100, -1))


def test_batch_heads_independent(device):
    """Each (batch, head) uses its own q / k / v: permuting the batch permutes the output."""
    q, k, v = make_qkv(3, 40, 40, 4, 2, 64, torch.float16, device)
    out = flashcore.flash_attn_func(q, k, v, causal=True)
    perm = torch.tensor([2, 0, 1])
    out_p = flashcore.flash_attn_func(q[perm], k[perm], v[perm], causal=True)
    assert torch.equal(out_p, out[perm])


# ---------------------------------------------------------------------------------------------------------------
# MQA / GQA

@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_ids.get)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("heads_q,heads_kv", [(3, 3), (4, 1), (8, 2), (7, 1), (14, 2)])
def test_gqa(heads_q, heads_kv, causal, dtype, device):
    q, k, v = make_qkv(2, 45, 61, heads_q, heads_kv, 64, dtype, device)
    run_and_check(q, k, v, causal=causal)


def test_gqa_reads_kv_head_by_index(device):
    """Query head h reads kv head h // group, not h % Hkv: heads 0-3 see kv head 0, 4-7 kv head 1."""
    q, k, v = make_qkv(1, 20, 20, 8, 2, 32, torch.float32, device)
    v = v.clone()
    v[:, :, 0] = 1.0      # softmax rows sum to 1: attention over kv head 0 gives exactly 1, over head 1 gives -1
    v[:, :, 1] = -1.0
    out = flashcore.flash_attn_func(q, k, v)
    torch.testing.assert_close(out[:, :, :4], torch.ones_like(out[:, :, :4]))
    torch.testing.assert_close(out[:, :, 4:], -torch.ones_like(out[:, :, 4:]))


# ---------------------------------------------------------------------------------------------------------------
# sliding window

@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_ids.get)
@pytest.mark.parametrize("window,causal", [
    ((16, -1), False),    # left only
    ((-1, 8), False),     # right only
    ((20, 5), False),     # both
    ((0, 0), False),      # each row sees exactly its diagonal key
    ((40, -1), True),     # left + causal (flash-attn's local causal)
    ((7, 100), True),     # causal overrides the right side
    ((33, 0), False),     # same thing spelled as a window
    ((200, 200), False),  # wider than the sequence: same as no window
], ids=lambda x: str(x).replace(" ", ""))
@pytest.mark.parametrize("seqlen_q,seqlen_k", [(96, 96), (50, 130), (130, 50)])
def test_window(window, causal, seqlen_q, seqlen_k, dtype, device):
    q, k, v = make_qkv(1, seqlen_q, seqlen_k, 2, 1, 64, dtype, device)
    run_and_check(q, k, v, causal=causal, window_size=window)


def test_window_matches_causal(device):
    """window (-1, 0) and causal=True are the same mask."""
    q, k, v = make_qkv(1, 70, 90, 2, 2, 64, torch.float32, device)
    a = flashcore.flash_attn_func(q, k, v, causal=True)
    b = flashcore.flash_attn_func(q, k, v, window_size=(-1, 0))
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_window_non_pow2_head_dim(device):
    q, k, v = make_qkv(1, 77, 77, 2, 2, 96, torch.float16, device)
    run_and_check(q, k, v, window_size=(10, 3))


# ---------------------------------------------------------------------------------------------------------------
# softcap, softmax_scale

@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_ids.get)
@pytest.mark.parametrize("softcap", [0.5, 5.0, 30.0])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_softcap(softcap, causal, dtype, device):
    # large scores so the cap actually bites
    q, k, v = make_qkv(1, 60, 75, 2, 2, 64, dtype, device, scale=2.0)
    run_and_check(q, k, v, causal=causal, softcap=softcap)


def test_softcap_with_window_and_gqa(device):
    q, k, v = make_qkv(2, 50, 50, 4, 2, 80, torch.float16, device, scale=2.0)
    run_and_check(q, k, v, causal=True, window_size=(12, -1), softcap=10.0)


def test_softcap_int_and_zero(device):
    q, k, v = make_qkv(1, 20, 20, 1, 1, 32, torch.float32, device)
    run_and_check(q, k, v, softcap=3)     # an int is a valid softcap
    a = flashcore.flash_attn_func(q, k, v, softcap=0.0)
    b = flashcore.flash_attn_func(q, k, v)
    assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_ids.get)
@pytest.mark.parametrize("softmax_scale", [0.01, 0.3, 1.0, 2])
def test_softmax_scale(softmax_scale, dtype, device):
    q, k, v = make_qkv(1, 40, 52, 2, 2, 64, dtype, device)
    run_and_check(q, k, v, softmax_scale=softmax_scale, causal=True)


def test_default_scale_is_inverse_sqrt_head_dim(device):
    q, k, v = make_qkv(1, 30, 30, 2, 2, 80, torch.float32, device)
    a = flashcore.flash_attn_func(q, k, v)
    b = flashcore.flash_attn_func(q, k, v, softmax_scale=1 / math.sqrt(80))
    assert torch.equal(a, b)


def test_large_scores_stable(device):
    """Scores in the hundreds: the online softmax must not overflow (fp32 inputs, fp16 would overflow q.k)."""
    q, k, v = make_qkv(1, 64, 64, 1, 1, 64, torch.float32, device, scale=4.0)
    run_and_check(q, k, v, softmax_scale=1.0)


# ---------------------------------------------------------------------------------------------------------------
# return_lse

@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_ids.get)
def test_return_lse(dtype, device):
    q, k, v = make_qkv(2, 37, 53, 4, 2, 64, dtype, device)
    with poisoned_allocations():
        out, lse = flashcore.flash_attn_func(q, k, v, causal=True, return_lse=True)
    assert lse.shape == (2, 4, 37) and lse.dtype == torch.float32 and lse.is_contiguous()
    assert_close_attention(out, q, k, v, lse=lse, causal=True)
    out2 = flashcore.flash_attn_func(q, k, v, causal=True)
    assert isinstance(out2, torch.Tensor)
    assert torch.equal(out, out2), "return_lse must not change out"


# ---------------------------------------------------------------------------------------------------------------
# strides

@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_ids.get)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_packed_qkv(causal, dtype, device):
    """q, k, v sliced out of one (B, S, 3, H, D) tensor: no copy, strides (S*3*H*D, 3*H*D, D, 1)."""
    qkv = torch.randn(2, 67, 3, 3, 64, device=device).to(dtype)
    q, k, v = qkv.unbind(dim=2)
    assert not q.is_contiguous() and q.data_ptr() != k.data_ptr()
    run_and_check(q, k, v, causal=causal)
    ref = flashcore.flash_attn_func(q.contiguous(), k.contiguous(), v.contiguous(), causal=causal)
    out = flashcore.flash_attn_func(q, k, v, causal=causal)
    assert torch.equal(out, ref), "strided and contiguous inputs must give identical results"


def test_packed_kv_gqa_non_pow2(device):
    """k, v from a packed (B, S, 2, Hkv, D) tensor, q from an (B, H, S, D) tensor transposed (SDPA layout)."""
    kv = torch.randn(1, 45, 2, 2, 80, device=device).to(torch.float16)
    k, v = kv.unbind(dim=2)
    q = torch.randn(1, 6, 39, 80, device=device).to(torch.float16).transpose(1, 2)
    run_and_check(q, k, v, causal=True)


def test_strided_sequence_and_batch(device):
    """Every other sequence position of a bigger tensor, and an offset start (storage_offset != 0)."""
    big = torch.randn(3, 120, 2, 64, device=device).to(torch.float16)
    q = big[1:, ::2]                    # (2, 60, 2, 64), storage offset, seq stride 2 * H * D
    k = big[:2, 1::3]                   # (2, 40, 2, 64)
    v = torch.randn(2, 40, 2, 64, device=device).to(torch.float16)
    assert q.storage_offset() > 0
    run_and_check(q, k, v, causal=True)


def test_inputs_not_modified(device):
    q, k, v = make_qkv(1, 40, 40, 2, 2, 64, torch.float16, device)
    copies = [t.clone() for t in (q, k, v)]
    flashcore.flash_attn_func(q, k, v, causal=True, return_lse=True)
    for t, c in zip((q, k, v), copies):
        assert torch.equal(t, c)


# ---------------------------------------------------------------------------------------------------------------
# empty problems

@pytest.mark.parametrize("return_lse", [False, True])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_seqlen_k_zero(causal, return_lse, device):
    """No keys at all: every row sees nothing, out 0 and lse -inf."""
    q, k, v = make_qkv(2, 9, 0, 2, 2, 64, torch.float16, device)
    with poisoned_allocations():
        res = flashcore.flash_attn_func(q, k, v, causal=causal, return_lse=return_lse)
    out = res[0] if return_lse else res
    assert out.shape == q.shape
    assert torch.equal(out, torch.zeros_like(out))
    if return_lse:
        assert res[1].shape == (2, 2, 9) and torch.isneginf(res[1]).all()


@pytest.mark.parametrize("shape", [(2, 0, 2, 64), (0, 5, 2, 64)], ids=["Sq0", "B0"])
def test_empty_query(shape, device):
    q = torch.randn(shape, device=device).to(torch.float16)
    k = torch.randn(shape[0], 7, 2, 64, device=device).to(torch.float16)
    out, lse = flashcore.flash_attn_func(q, k, k, causal=True, return_lse=True)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == (shape[0], 2, shape[1]) and lse.dtype == torch.float32


# ---------------------------------------------------------------------------------------------------------------
# explicit tile configs (what the tuner launches): edges of blocks in every direction

CONFIGS = [
    {"BLOCK_M": 16, "BLOCK_N": 64, "num_warps": 4, "num_stages": 1},
    {"BLOCK_M": 64, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1},
    {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 2, "num_stages": 1},
    {"BLOCK_M": 128, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2},
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"m{c['BLOCK_M']}n{c['BLOCK_N']}")
@pytest.mark.parametrize("case", [
    dict(seqlen_q=100, seqlen_k=100, causal=True),
    dict(seqlen_q=37, seqlen_k=150, causal=True),
    dict(seqlen_q=150, seqlen_k=37, causal=True),
    dict(seqlen_q=90, seqlen_k=110, window=(17, 9)),
    dict(seqlen_q=110, seqlen_k=90, causal=True, window=(23, -1), softcap=4.0),
    dict(seqlen_q=65, seqlen_k=65, head_dim=80),
], ids=["causal", "causal_q<k", "causal_q>k", "window", "window_causal_softcap", "d80"])
def test_explicit_config(config, case, device):
    case = dict(case)
    head_dim = case.pop("head_dim", 64)
    seqlen_q, seqlen_k = case.pop("seqlen_q"), case.pop("seqlen_k")
    q, k, v = make_qkv(1, seqlen_q, seqlen_k, 2, 1, head_dim, torch.float16, device)
    out, lse = forward_with_config(q, k, v, config, **case)
    window = case.pop("window", (-1, -1))
    assert_close_attention(out, q, k, v, lse=lse, window_size=window, **case)


@pytest.mark.parametrize("config", CONFIGS[:3], ids=lambda c: f"m{c['BLOCK_M']}n{c['BLOCK_N']}")
@pytest.mark.parametrize("head_dim", [16, 80, 96, 256])
def test_explicit_config_head_dims_gqa7(head_dim, config, device):
    """Non-power-of-two head dims (padded to BLOCK_D) with every tile shape, GQA 7:1, Sq > Sk, window."""
    seqlen = 23 if head_dim == 256 else 70
    q, k, v = make_qkv(1, seqlen + 9, seqlen, 7, 1, head_dim, torch.float32, device)
    out, lse = forward_with_config(q, k, v, config, causal=True, window=(19, -1))
    assert_close_attention(out, q, k, v, lse=lse, causal=True, window_size=(19, -1))


def test_configs_agree(device):
    """Different tiles give the same answer up to fp32 accumulation order (fp32 inputs)."""
    q, k, v = make_qkv(1, 83, 97, 2, 2, 64, torch.float32, device)
    outs = [forward_with_config(q, k, v, c, causal=True, window=(30, -1))[0] for c in CONFIGS]
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# no state leaks between calls

def test_no_state_leak_between_calls(device):
    """attention_forward twice (and different problems in between): results depend only on the inputs."""
    config = {"BLOCK_M": 16, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1}
    a = make_qkv(1, 50, 70, 2, 2, 64, torch.float16, device)
    b = make_qkv(2, 33, 33, 4, 2, 64, torch.float16, device)
    out_a1, lse_a1 = forward_with_config(*a, config, causal=True)
    out_b, lse_b = forward_with_config(*b, config, causal=False)
    out_a2, lse_a2 = forward_with_config(*a, config, causal=True)
    assert torch.equal(out_a1, out_a2) and torch.equal(lse_a1, lse_a2)
    assert out_a1.data_ptr() != out_a2.data_ptr(), "each call returns a fresh output"
    assert_close_attention(out_a2, *a, lse=lse_a2, causal=True)
    assert_close_attention(out_b, *b, lse=lse_b)
    # a problem with the same spec and new values: nothing of the first one survives
    a_new = make_qkv(1, 50, 70, 2, 2, 64, torch.float16, device)
    out_new, lse_new = forward_with_config(*a_new, config, causal=True)
    assert_close_attention(out_new, *a_new, lse=lse_new, causal=True)


def test_dispatch_memo_default_config(device, monkeypatch):
    """Without a config (and tuning off), dispatch resolves the default once per (spec, bucket) and reuses it."""
    monkeypatch.setenv("FLASHCORE_TUNING", "off")
    q, k, v = make_qkv(1, 40, 40, 2, 2, 64, torch.float16, device)
    dispatch.clear()
    run_and_check(q, k, v, causal=True)
    spec = make_spec(q, k, v, causal=True, window=False, softcap=False)
    memo = {key: cfg for key, cfg in dispatch._memo.items() if key[0] == spec}
    assert len(memo) == 1 and list(memo.values())[0] == default_config(spec)
    run_and_check(q, k, v, causal=True)
    assert len([key for key in dispatch._memo if key[0] == spec]) == 1
    dispatch.clear()


# ---------------------------------------------------------------------------------------------------------------
# randomized: small random problems over every feature at once

def test_random_problems(device):
    gen = torch.Generator().manual_seed(torch.initial_seed() % (2 ** 31))
    head_dims = [16, 32, 48, 64, 80, 96, 112, 128]

    def pick(options):
        return options[int(torch.randint(len(options), (1,), generator=gen))]

    for _ in range(30):
        heads_kv = pick([1, 2])
        heads_q = heads_kv * pick([1, 2, 3])
        seqlen_q, seqlen_k = pick([1, 7, 31, 64, 90]), pick([1, 16, 45, 100])
        causal = pick([False, True])
        window = (pick([-1, -1, 0, 5, 40]), pick([-1, -1, 0, 3, 30]))
        softcap = pick([0.0, 0.0, 6.0])
        dtype = pick([torch.float16, torch.float32])
        q, k, v = make_qkv(pick([1, 2]), seqlen_q, seqlen_k, heads_q, heads_kv, pick(head_dims), dtype, device)
        try:
            run_and_check(q, k, v, causal=causal, window_size=window, softcap=softcap)
        except AssertionError as e:
            raise AssertionError(f"{tuple(q.shape)} k {tuple(k.shape)} {dtype} causal={causal} window={window} "
                                 f"softcap={softcap}: {e}") from e


def test_tolerance_is_meaningful():
    """The tolerance catches small mistakes (a 10% scale error, a causal mask off by one key)."""
    q, k, v = make_qkv(1, 64, 64, 2, 2, 64, torch.float16, "cpu")
    atol = tolerance(q, k, v, causal=True)
    assert atol < 0.05
    wrong, _ = attention_ref(q, k, v, causal=True, softmax_scale=1.1 / 8)
    right, _ = attention_ref(q, k, v, causal=True)
    assert (wrong - right).abs().max().item() > atol
    shifted, _ = attention_ref(q, k, v, window_size=(-1, 1))
    assert (shifted - right).abs().max().item() > atol


def test_tensor_descriptor_eligibility():
    """TMA needs 16-byte aligned bases and strides; broadcast (stride-0) and misaligned inputs take pointer loads."""
    from flashcore.ops.attn_fwd.host import tma_ok
    base = torch.empty(2, 64, 4, 128, dtype=torch.float16)
    assert tma_ok(base)
    assert tma_ok(torch.empty(2, 64, 3, 4, 128, dtype=torch.float16)[:, :, 0])    # q out of packed qkv
    assert not tma_ok(base[:1].expand(2, 64, 4, 128))                              # broadcast batch
    assert not tma_ok(torch.empty(2, 64, 4, 132, dtype=torch.float16)[..., :128])  # 264-byte head stride
    assert not tma_ok(torch.empty(2 * 64 * 4 * 128 + 1, dtype=torch.float16)[1:].view(2, 64, 4, 128))  # base 2 bytes off
