"""GPU suite (marker `gpu`; run on a CUDA machine with `pytest -m gpu`): the real kernels at real sizes.

bf16 included (the interpreter's tl.dot is wrong for bf16, so only here), every template variant, TMA and
non-TMA loads, torch.compile(fullgraph=True), CUDA graph capture and replay. Checked against the float64
reference (tests/reference.py) with a tolerance relative to what PyTorch itself loses in the same dtype.
"""
from __future__ import annotations

import pytest
import torch

import flashcore
from flashcore.ops.attn_fwd.host import attention_forward, make_spec
from flashcore.reference import assert_close_attention, attention_ref, tolerance
from poison import poisoned_allocations

pytestmark = pytest.mark.gpu

DEV = "cuda"
BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
dtype_ids = {BF16: "bf16", FP16: "fp16", FP32: "fp32"}


def make_qkv(batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim, dtype, scale=1.0):
    q = (torch.randn(batch, seqlen_q, heads_q, head_dim, device=DEV) * scale).to(dtype)
    k = (torch.randn(batch, seqlen_k, heads_kv, head_dim, device=DEV) * scale).to(dtype)
    v = torch.randn(batch, seqlen_k, heads_kv, head_dim, device=DEV).to(dtype)
    return q, k, v


def check(q, k, v, *, return_lse=True, **kwargs):
    with poisoned_allocations():
        res = flashcore.flash_attn_func(q, k, v, return_lse=return_lse, **kwargs)
    out, lse = res if return_lse else (res, None)
    torch.cuda.synchronize()
    assert_close_attention(out, q, k, v, lse=lse, **kwargs)
    return out, lse


def is_sm90() -> bool:
    return torch.cuda.get_device_capability()[0] >= 9


# ---------------------------------------------------------------------------------------------------------------
# large shapes, every dtype

@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("dtype", [BF16, FP16], ids=dtype_ids.get)
def test_large(dtype, head_dim, causal):
    q, k, v = make_qkv(2, 2048, 2048, 16, 16, head_dim, dtype)
    check(q, k, v, causal=causal)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("head_dim", [80, 96, 192])
@pytest.mark.parametrize("dtype", [BF16, FP16], ids=dtype_ids.get)
def test_non_pow2_head_dims(dtype, head_dim, causal):
    q, k, v = make_qkv(2, 1000, 1100, 8, 8, head_dim, dtype)
    check(q, k, v, causal=causal)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_fp32(causal):
    q, k, v = make_qkv(1, 777, 777, 4, 2, 128, FP32)
    check(q, k, v, causal=causal)


@pytest.mark.parametrize("dtype", [BF16, FP16], ids=dtype_ids.get)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_gqa_32_8(causal, dtype):
    q, k, v = make_qkv(2, 2048, 2048, 32, 8, 128, dtype)
    check(q, k, v, causal=causal)


@pytest.mark.parametrize("heads_q,heads_kv", [(16, 1), (28, 4), (12, 12)])
def test_gqa_ratios(heads_q, heads_kv):
    q, k, v = make_qkv(1, 1024, 1024, heads_q, heads_kv, 128, BF16)
    check(q, k, v, causal=True)


@pytest.mark.parametrize("seqlen_q,seqlen_k", [(1, 4096), (7, 3000), (1000, 3000), (3000, 1000), (4096, 1),
                                               (129, 129), (4097, 4097)])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_seqlens(seqlen_q, seqlen_k, causal):
    q, k, v = make_qkv(1, seqlen_q, seqlen_k, 8, 2, 128, BF16)
    out, lse = check(q, k, v, causal=causal)
    if causal and seqlen_q > seqlen_k:
        blind = seqlen_q - seqlen_k
        assert torch.equal(out[:, :blind], torch.zeros_like(out[:, :blind]))
        assert torch.isneginf(lse[..., :blind]).all()


@pytest.mark.parametrize("head_dim", [64, 128])
def test_seqlen_k_zero(head_dim):
    """No keys: out 0, lse -inf (not a crash)."""
    q, k, v = make_qkv(2, 300, 0, 8, 2, head_dim, BF16)
    out, lse = flashcore.flash_attn_func(q, k, v, causal=True, return_lse=True)
    torch.cuda.synchronize()
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()


def test_empty_query_and_batch():
    for shape in ((2, 0, 8, 128), (0, 300, 8, 128)):
        q = torch.randn(shape, device=DEV).to(BF16)
        k = torch.randn(shape[0], 300, 2, 128, device=DEV).to(BF16)
        out, lse = flashcore.flash_attn_func(q, k, k, causal=True, return_lse=True)
        assert out.shape == q.shape and lse.shape == (shape[0], 8, shape[1])


# ---------------------------------------------------------------------------------------------------------------
# window, softcap, lse, scale

@pytest.mark.parametrize("window,causal", [
    ((256, 0), False), ((256, -1), True), ((128, 64), False), ((-1, 32), False), ((0, 0), False), ((1024, -1), True),
], ids=lambda x: str(x).replace(" ", ""))
@pytest.mark.parametrize("head_dim", [64, 128])
def test_window(window, causal, head_dim):
    q, k, v = make_qkv(2, 2048, 2048, 8, 4, head_dim, BF16)
    check(q, k, v, causal=causal, window_size=window)


def test_window_q_ne_k():
    q, k, v = make_qkv(1, 700, 2100, 8, 8, 96, BF16)
    check(q, k, v, causal=True, window_size=(300, -1))
    q, k, v = make_qkv(1, 2100, 700, 8, 8, 128, FP16)
    check(q, k, v, window_size=(100, 50))


@pytest.mark.parametrize("dtype", [BF16, FP16], ids=dtype_ids.get)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_softcap(causal, dtype):
    q, k, v = make_qkv(2, 2048, 2048, 16, 8, 128, dtype, scale=2.0)
    check(q, k, v, causal=causal, softcap=30.0)


def test_softcap_window_gqa_all_at_once():
    q, k, v = make_qkv(2, 1536, 1536, 32, 8, 128, BF16, scale=2.0)
    check(q, k, v, causal=True, window_size=(512, -1), softcap=50.0, softmax_scale=0.1)


@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_return_lse_bf16(head_dim):
    q, k, v = make_qkv(2, 1024, 1536, 8, 2, head_dim, BF16)
    out, lse = flashcore.flash_attn_func(q, k, v, causal=True, return_lse=True)
    assert lse.shape == (2, 8, 1024) and lse.dtype == FP32 and lse.is_contiguous()
    assert_close_attention(out, q, k, v, lse=lse, causal=True)
    assert torch.equal(out, flashcore.flash_attn_func(q, k, v, causal=True))


@pytest.mark.parametrize("softmax_scale", [0.02, 0.5])
def test_softmax_scale(softmax_scale):
    q, k, v = make_qkv(1, 1024, 1024, 8, 8, 128, BF16)
    check(q, k, v, softmax_scale=softmax_scale, causal=True)


def test_deterministic():
    q, k, v = make_qkv(2, 2048, 2048, 16, 4, 128, BF16)
    a = flashcore.flash_attn_func(q, k, v, causal=True)
    b = flashcore.flash_attn_func(q, k, v, causal=True)
    assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------------------------
# strides, TMA and non-TMA

@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_packed_qkv(head_dim, causal):
    """q, k, v views of one (B, S, 3, H, D) tensor: aligned strides, so TMA stays on (sm90)."""
    qkv = torch.randn(2, 2048, 3, 16, head_dim, device=DEV).to(BF16)
    q, k, v = qkv.unbind(dim=2)
    spec = make_spec(q, k, v, causal, False, False)
    assert spec["tma"] == is_sm90()
    out, _ = check(q, k, v, causal=causal)
    ref = flashcore.flash_attn_func(q.contiguous(), k.contiguous(), v.contiguous(), causal=causal)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def _misaligned_copy(t: torch.Tensor) -> torch.Tensor:
    """Same values, base pointer 2 bytes off a 16-byte boundary: tensor descriptors can't take it."""
    flat = torch.empty(t.numel() + 8, dtype=t.dtype, device=t.device)
    out = flat[1:1 + t.numel()].view(t.shape)
    out.copy_(t)
    assert out.data_ptr() % 16 != 0
    return out


def _odd_seq_stride(t: torch.Tensor) -> torch.Tensor:
    """Same values, sequence stride (H*D + 4) elements: not a multiple of 16 bytes."""
    b, s, h, d = t.shape
    buf = torch.empty(b, s, h * d + 4, dtype=t.dtype, device=t.device)
    out = buf[..., : h * d].view(b, s, h, d)
    out.copy_(t)
    return out


@pytest.mark.parametrize("make_odd", [_misaligned_copy, _odd_seq_stride], ids=["misaligned_base", "odd_stride"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_tma_and_non_tma_paths(make_odd, causal):
    q, k, v = make_qkv(2, 1500, 1500, 8, 2, 128, BF16)
    spec_tma = make_spec(q, k, v, causal, False, False)
    assert spec_tma["tma"] == is_sm90(), "contiguous pow2 head_dim inputs take TMA on sm90+"
    qo, ko, vo = (make_odd(t) for t in (q, k, v))
    assert not make_spec(qo, ko, vo, causal, False, False)["tma"], "unaligned inputs must not take TMA"
    out_tma, _ = check(q, k, v, causal=causal)
    out_plain, _ = check(qo, ko, vo, causal=causal)
    # two code paths, same math: agree to within bf16 rounding of the output
    torch.testing.assert_close(out_tma, out_plain, rtol=0, atol=2e-2)


def test_non_tma_for_non_pow2_head_dim():
    q, k, v = make_qkv(1, 512, 512, 4, 4, 80, BF16)
    assert not make_spec(q, k, v, False, False, False)["tma"]


def test_strided_sdpa_layout_kv_cache_slice():
    """k, v as (B, H, S, D) transposed and a slice of a longer cache: no copies needed."""
    cache_k = torch.randn(2, 8, 3000, 128, device=DEV).to(BF16)
    cache_v = torch.randn(2, 8, 3000, 128, device=DEV).to(BF16)
    k = cache_k[:, :, :2000].transpose(1, 2)
    v = cache_v[:, :, :2000].transpose(1, 2)
    q = torch.randn(2, 8, 1000, 128, device=DEV).to(BF16).transpose(1, 2)
    check(q, k, v, causal=True)


# ---------------------------------------------------------------------------------------------------------------
# explicit tile configs on the GPU

@pytest.mark.parametrize("config", [
    {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2},
    {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3},
    {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 2},
    {"BLOCK_M": 16, "BLOCK_N": 32, "num_warps": 1, "num_stages": 1},
], ids=lambda c: "m{BLOCK_M}n{BLOCK_N}w{num_warps}s{num_stages}".format(**c))
def test_explicit_configs(config):
    q, k, v = make_qkv(1, 1111, 1234, 8, 2, 128, BF16)
    out, lse = attention_forward(q, k, v, 128 ** -0.5, True, 200, 0, 0.0, True, config=dict(config))
    assert_close_attention(out, q, k, v, lse=lse, causal=True, window_size=(200, -1))


# ---------------------------------------------------------------------------------------------------------------
# torch.compile and CUDA graphs

def test_torch_compile_fullgraph():
    import torch._dynamo
    torch._dynamo.reset()

    def layer(q, k, v):
        out, lse = flashcore.flash_attn_func(q * 1.0, k, v, causal=True, window_size=(256, -1), return_lse=True)
        return out.float().sum(dim=-1) + lse.transpose(1, 2), out

    compiled = torch.compile(layer, fullgraph=True)
    q, k, v = make_qkv(2, 1024, 1024, 16, 4, 128, BF16)
    got_sum, got_out = compiled(q, k, v)
    want_sum, want_out = layer(q, k, v)
    assert torch.equal(got_out, want_out)
    torch.testing.assert_close(got_sum, want_sum, rtol=1e-5, atol=1e-3)
    assert_close_attention(got_out, q, k, v, causal=True, window_size=(256, -1))
    # new values, same shapes: no recompilation needed, still right
    q2, k2, v2 = make_qkv(2, 1024, 1024, 16, 4, 128, BF16)
    _, out2 = compiled(q2, k2, v2)
    assert_close_attention(out2, q2, k2, v2, causal=True, window_size=(256, -1))


def test_torch_compile_dynamic_shapes():
    import torch._dynamo
    torch._dynamo.reset()
    compiled = torch.compile(lambda q, k, v: flashcore.flash_attn_func(q, k, v, causal=True), fullgraph=True,
                             dynamic=True)
    for seqlen in (300, 517):
        q, k, v = make_qkv(1, seqlen, seqlen, 8, 8, 64, FP16)
        assert_close_attention(compiled(q, k, v), q, k, v, causal=True)


@pytest.mark.parametrize("return_lse", [False, True])
def test_cuda_graph_capture_replay(return_lse):
    kwargs = dict(causal=True, window_size=(512, -1), softcap=30.0)
    static = make_qkv(2, 1024, 1024, 16, 4, 128, BF16)
    static_q, static_k, static_v = (t.clone() for t in static)

    def call():
        return flashcore.flash_attn_func(static_q, static_k, static_v, return_lse=return_lse, **kwargs)

    # warm up on a side stream (compiles the kernel, resolves dispatch) before capture
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            call()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_res = call()
    for _ in range(3):
        q, k, v = make_qkv(2, 1024, 1024, 16, 4, 128, BF16)
        static_q.copy_(q)
        static_k.copy_(k)
        static_v.copy_(v)
        graph.replay()
        torch.cuda.synchronize()
        out, lse = static_res if return_lse else (static_res, None)
        assert_close_attention(out, q, k, v, lse=lse, **kwargs)
        eager = flashcore.flash_attn_func(q, k, v, return_lse=return_lse, **kwargs)
        eager_out = eager[0] if return_lse else eager
        assert torch.equal(out, eager_out), "graph replay must match the eager call bit for bit"


@pytest.mark.parametrize("window", [(0, 2**31 - 1), (2**31 - 1, 2**31 - 1), (2**31 - 1, 0)])
def test_window_sides_at_int32_max(window):
    q, k, v = make_qkv(2, 777, 1000, 8, 2, 128, BF16)
    check(q, k, v, window_size=window)


@pytest.mark.parametrize("batch, heads", [(4096, 32), (2048, 64)], ids=["B4096xH32", "B2048xH64"])
def test_batch_times_heads_past_65535(batch, heads):
    """B * Hq = 131072 program rows: heads and batch run on their own grid axes."""
    q, k, v = make_qkv(batch, 16, 16, heads, heads // 8, 64, BF16)
    check(q, k, v, causal=True)


def test_alibi_bf16_gqa_tma():
    q, k, v = make_qkv(2, 1000, 1000, 32, 8, 128, BF16)
    slopes = torch.rand(2, 32, device=DEV) * 0.1
    check(q, k, v, causal=True, alibi_slopes=slopes)


@pytest.mark.parametrize("head_dim", [128, 96], ids=["tma", "pointers"])
def test_launch_plan_reuses_the_compiled_kernel_with_new_tensors(head_dim):
    """Calls of one signature after the first launch the kept compiled kernel directly (descriptors rebuilt over
    each call's tensors); every call's answer is its own inputs' answer."""
    from flashcore.ops.attn_fwd import host
    host._plans.clear()
    for _ in range(4):
        q, k, v = make_qkv(2, 300, 300, 8, 2, head_dim, BF16)
        assert_close_attention(flashcore.flash_attn_func(q, k, v, causal=True), q, k, v, causal=True)
    (plan,) = host._plans.values()
    assert plan.run is not None, "the plan fell back to Triton's per-call launch path"
    packed = torch.randn(2, 300, 3, 8, head_dim, device="cuda", dtype=BF16)      # other strides: another plan
    q, k, v = packed[:, :, 0], packed[:, :, 1, :2], packed[:, :, 2, :2]
    assert_close_attention(flashcore.flash_attn_func(q, k, v, causal=True), q, k, v, causal=True)
    assert len(host._plans) == 2


def test_cuda_graph_of_compiled_function():
    """torch.compile(mode='reduce-overhead') wraps the op in CUDA graphs itself."""
    import torch._dynamo
    torch._dynamo.reset()
    compiled = torch.compile(lambda q, k, v: flashcore.flash_attn_func(q, k, v, causal=True),
                             mode="reduce-overhead", fullgraph=True)
    for _ in range(3):
        q, k, v = make_qkv(1, 512, 512, 8, 8, 64, BF16)
        out = compiled(q, k, v).clone()
        assert_close_attention(out, q, k, v, causal=True)


# ---------------------------------------------------------------------------------------------------------------
# the tolerance is tight enough to mean something at these sizes

def test_bf16_tolerance_rejects_a_wrong_answer():
    q, k, v = make_qkv(1, 1024, 1024, 8, 8, 128, BF16)
    atol = tolerance(q, k, v, causal=True)
    wrong, _ = attention_ref(q, k, v, window_size=(-1, 1))      # the causal mask off by one key
    right, _ = attention_ref(q, k, v, causal=True)
    assert (wrong - right).abs().max().item() > atol, atol
