"""flash_attn_varlen_func's backward (ops/attn_bwd's varlen kernels, packed K/V) on the CPU interpreter: dq, dk, dv
against float64 autograd of the per-sequence reference (flashcore.reference.varlen_ref), with test_backward.py's
tolerance rule (a multiple of what PyTorch's own autograd loses in the inputs' dtype, plus a floor).

Covered: lengths 0 and 1 (empty sequences in the middle and at the end, no query or no key at all), causal and
not with seqlen_q != seqlen_k per sequence both ways (rows that see no key get dq = 0 exactly), GQA 4 and 7 and MQA
(dk, dv summed over a kv head's query heads), windows, softcap, ALiBi ((Hq,) and (B, Hq) slopes), softmax_scale,
head dims 64 / 80 / 128, a 257-token sequence, explicit tiles with BLOCK_M != BLOCK_N, packed qkv / kv views (the
gradient lands in the packed tensor), a returned lse that the loss reads, a kept plan re-run with other cu_seqlens
values, determinism, torch.compile, torch.autograd.gradcheck through the fp32 kernels, and the paged call that
still refuses gradients. Both backward schemes (test_backward's `deterministic` fixture) on the gradient cases, explicit tiles, rows
without keys, the lse gradient and gradcheck; the packed functions run the default's (atomic dQ).

Every input is the first rows of a NaN-tailed buffer (a read past its end shows as NaN), dout too; every FlashCore
call runs with poisoned allocations (dq, dk, dv, delta NaN-filled), so a gradient row no program writes fails.
"""
from __future__ import annotations

import pytest
import torch

import flashcore
from flashcore.ops.attn_bwd import host
from flashcore.reference import varlen_ref
from poison import poisoned_allocations
from test_backward import (assert_grads_close, assert_schemes_launch, deterministic,  # noqa: F401 (a fixture)
                           gradcheck_through_fp32)
from test_varlen import cu_seqlens, make_paged, make_varlen, nan_tailed

pytestmark = pytest.mark.usefixtures("cpu_only")

DTYPES = [pytest.param(torch.float16, id="fp16"), pytest.param(torch.float32, id="fp32")]


def _inputs(lens_q, lens_k, heads_q, heads_kv, head_dim, dtype) -> tuple[dict, torch.Tensor]:
    """A packed call's arguments, q (total_q, Hq, D), k, v (total_k, Hkv, D) leaves requiring grad, and an upstream
    gradient dout like q."""
    args = make_varlen(lens_q, lens_k, heads_q, heads_kv, head_dim, dtype, "cpu")
    for name in "qkv":
        args[name].requires_grad_()
    return args, nan_tailed(sum(lens_q), heads_q, head_dim, dtype, "cpu")


def _grads(args: dict, dout, **options) -> list[torch.Tensor]:
    """dq, dk, dv of flash_attn_varlen_func, forward and backward with poisoned allocations."""
    with poisoned_allocations():
        flashcore.flash_attn_varlen_func(**args, **options).backward(dout)
    grads = [args[name].grad for name in "qkv"]
    for name in "qkv":
        args[name].grad = None
    return grads


def _check(grads, args: dict, dout, **options) -> None:
    assert_grads_close(grads, args["q"], args["k"], args["v"], dout, reference=varlen_ref,
                       cu_seqlens_q=args["cu_seqlens_q"], cu_seqlens_k=args["cu_seqlens_k"], **options)


# (lens_q, lens_k, heads_q, heads_kv, head_dim), options
CASES = [
    pytest.param(([5, 0, 40, 1, 17, 0], [5, 0, 40, 1, 17, 0], 2, 2, 64), {}, id="mixed-empty-and-single"),
    pytest.param(([12, 33, 1, 0, 6], [30, 10, 1, 4, 0], 2, 2, 80), dict(causal=True), id="causal-sq-vs-sk-d80"),
    pytest.param(([12, 33, 1, 0, 6], [30, 10, 1, 4, 0], 2, 2, 80), {}, id="sq-vs-sk-d80"),
    pytest.param(([20, 1, 37], [41, 3, 37], 8, 2, 64), dict(causal=True), id="gqa4-causal"),
    pytest.param(([9, 0, 22], [14, 6, 22], 14, 2, 64), {}, id="gqa7"),
    pytest.param(([25, 3, 0], [25, 10, 2], 3, 1, 64), dict(causal=True), id="mqa-causal"),
    pytest.param(([30, 7], [30, 12], 2, 2, 128), dict(softmax_scale=0.3), id="d128-scale"),
    pytest.param(([40, 0, 13], [50, 6, 9], 2, 2, 64), dict(window_size=(7, 3)), id="window"),
    pytest.param(([45, 10], [30, 10], 2, 1, 64), dict(window_size=(5, -1), causal=True), id="window-causal-sq>sk"),
    pytest.param(([30, 9], [18, 25], 2, 2, 64), dict(window_size=(-1, 2)), id="window-right-only"),
    pytest.param(([33, 1], [40, 20], 2, 2, 64), dict(softcap=2.0), id="softcap"),
    pytest.param(([33, 18], [40, 9], 2, 2, 64), dict(softcap=5.0, causal=True), id="softcap-causal"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,options", CASES)
def test_gradients_match_the_reference(shape, options, dtype, deterministic):
    args, dout = _inputs(*shape, dtype)
    _check(_grads(args, dout, deterministic=deterministic, **options), args, dout, **options)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("per_sequence", [False, True], ids=["slopes-per-head", "slopes-per-sequence"])
def test_alibi_gradients(per_sequence, dtype, deterministic):
    args, dout = _inputs([20, 0, 33], [25, 4, 30], 4, 2, 64, dtype)
    slopes = (torch.rand(3, 4) if per_sequence else torch.rand(4)).requires_grad_()
    _check(_grads(args, dout, alibi_slopes=slopes, causal=True, deterministic=deterministic), args, dout,
           alibi_slopes=slopes.detach(), causal=True)
    assert slopes.grad is None, "ALiBi slopes get no gradient (flash-attn's behaviour)"


def test_a_257_token_sequence(deterministic):
    args, dout = _inputs([257, 5], [257, 9], 1, 1, 64, torch.float32)
    _check(_grads(args, dout, causal=True, deterministic=deterministic), args, dout, causal=True)


@pytest.mark.parametrize("options", [dict(causal=True), dict(window_size=(9, 4))], ids=["causal", "window"])
@pytest.mark.parametrize("tiles", [(16, 32, 32, 16), (32, 16, 16, 32)], ids=["kv16-q32", "kv32-q16"])
def test_explicit_tiles(tiles, options, deterministic):
    """BLOCK_M != BLOCK_N in both kernels, so that a program that found its key block with the row tile (or its
    row block with the key tile) would be caught; several blocks per sequence, partial ones at the ends."""
    dkdv_m, dkdv_n, dq_m, dq_n = tiles
    config = {"dkdv.BLOCK_M": dkdv_m, "dkdv.BLOCK_N": dkdv_n, "dq.BLOCK_M": dq_m, "dq.BLOCK_N": dq_n,
              "dkdv.num_warps": 4, "dkdv.num_stages": 1, "dq.num_warps": 4, "dq.num_stages": 1}
    args, dout = _inputs([40, 0, 23, 1], [29, 5, 50, 1], 4, 2, 64, torch.float16)
    q, k, v = (args[name].detach() for name in "qkv")
    out, lse, _ = flashcore.flash_attn_varlen_func(q, k, v, args["cu_seqlens_q"], args["cu_seqlens_k"],
                                                   args["max_seqlen_q"], args["max_seqlen_k"], return_attn_probs=True,
                                                   **options)
    window_left, window_right = options.get("window_size", (-1, 0 if options.get("causal") else -1))
    with poisoned_allocations():
        grads = host.varlen_attention_backward(dout, q, k, v, out, lse, args["cu_seqlens_q"], args["cu_seqlens_k"],
                                               args["max_seqlen_q"], args["max_seqlen_k"], 64 ** -0.5,
                                               bool(options.get("causal")), window_left, window_right, 0.0,
                                               dq_atomic=not deterministic, config=config)
    _check(list(grads), args, dout, **options)


def test_rows_without_keys_and_empty_sequences_get_zero_gradients(deterministic):
    """Causal with seqlen_q > seqlen_k: a sequence's first rows see no key (dq exactly 0); a sequence without
    queries gets dk = dv = 0 exactly, one without keys dq = 0; nothing is NaN."""
    lens_q, lens_k = [6, 0, 10, 3], [2, 5, 0, 3]
    args, dout = _inputs(lens_q, lens_k, 2, 2, 64, torch.float32)
    dq, dk, dv = _grads(args, dout, causal=True, deterministic=deterministic)
    assert not dq[:4].any(), "rows that see no key have a nonzero dq"
    assert not dk[2:7].any() and not dv[2:7].any(), "keys no query sees have a nonzero dk / dv"
    assert not dq[6:16].any(), "rows of a sequence without keys have a nonzero dq"
    _check([dq, dk, dv], args, dout, causal=True)


def test_each_scheme_runs_its_own_kernels(monkeypatch):
    args, dout = _inputs([9, 0, 14], [9, 5, 20], 2, 1, 64, torch.float16)

    def run(**options):
        flashcore.flash_attn_varlen_func(**args, causal=True, **options).backward(dout)
    assert_schemes_launch(monkeypatch, run)


@pytest.mark.parametrize("lens_q,lens_k", [([0, 0], [4, 7]), ([4, 7], [0, 0])], ids=["no-query", "no-key"])
def test_no_query_or_no_key_at_all(lens_q, lens_k):
    args, dout = _inputs(lens_q, lens_k, 2, 2, 64, torch.float32)
    for grad, name in zip(_grads(args, dout, causal=True), "qkv"):
        assert grad.shape == args[name].shape and not grad.any()


@pytest.mark.parametrize("dtype", DTYPES)
def test_qkvpacked_gradient_lands_in_qkv(dtype):
    """qkv (total, 3, H, D) through flash_attn_varlen_qkvpacked_func: strided views in, qkv.grad out."""
    lens = [11, 0, 40, 1]
    qkv = nan_tailed(sum(lens), 3 * 2, 64, dtype, "cpu").unflatten(1, (3, 2)).requires_grad_()
    dout = nan_tailed(sum(lens), 2, 64, dtype, "cpu")
    cu = cu_seqlens(lens, "cpu")
    with poisoned_allocations():
        flashcore.flash_attn_varlen_qkvpacked_func(qkv, cu, max(lens), causal=True).backward(dout)
    assert qkv.grad.shape == qkv.shape
    leaves = [t.detach().clone().requires_grad_() for t in qkv.unbind(1)]
    assert_grads_close(list(qkv.grad.unbind(1)), *leaves, dout, reference=varlen_ref, cu_seqlens_q=cu,
                       cu_seqlens_k=cu, causal=True)


def test_kvpacked_gradient_lands_in_kv():
    """kv (total_k, 2, Hkv, D) through flash_attn_varlen_kvpacked_func, GQA 2, softcap: kv.grad holds dk, dv."""
    lens_q, lens_k = [7, 30, 0, 2], [20, 30, 4, 0]
    args, dout = _inputs(lens_q, lens_k, 4, 2, 64, torch.float16)
    kv = torch.stack([args["k"].detach(), args["v"].detach()], 1).requires_grad_()
    with poisoned_allocations():
        flashcore.flash_attn_varlen_kvpacked_func(args["q"], kv, args["cu_seqlens_q"], args["cu_seqlens_k"],
                                                  max(lens_q), max(lens_k), causal=True, softcap=8.0).backward(dout)
    assert kv.grad.shape == kv.shape
    assert_grads_close([args["q"].grad, *kv.grad.unbind(1)], args["q"], args["k"], args["v"], dout,
                       reference=varlen_ref, cu_seqlens_q=args["cu_seqlens_q"], cu_seqlens_k=args["cu_seqlens_k"],
                       causal=True, softcap=8.0)


def test_lse_gradient(deterministic):
    """A loss that reads the returned softmax_lse: d lse / d scores = P enters the backward too."""
    args, dout = _inputs([12, 20, 1], [15, 20, 3], 2, 1, 64, torch.float32)
    with poisoned_allocations():
        out, lse, _ = flashcore.flash_attn_varlen_func(**args, deterministic=deterministic, return_attn_probs=True)
        ((out * dout).sum() + lse.square().sum()).backward()
    leaves = [args[name].detach().double().requires_grad_() for name in "qkv"]
    ref_out, ref_lse = varlen_ref(*leaves, args["cu_seqlens_q"], args["cu_seqlens_k"])
    ((ref_out * dout.double()).sum() + ref_lse.square().sum()).backward()
    for name, ref in zip("qkv", leaves):
        torch.testing.assert_close(args[name].grad.double(), ref.grad, atol=1e-4, rtol=1e-4)


def test_gradcheck_through_the_fp32_kernels(deterministic):
    """torch.autograd.gradcheck on float64 leaves through the fp32 (ieee) kernels (test_backward's
    gradcheck_through_fp32), out and lse differentiated."""
    lens_q, lens_k = [3, 0, 5, 1], [4, 2, 5, 1]          # causal, seqlen_q <= seqlen_k: every lse is finite
    cu_q, cu_k = cu_seqlens(lens_q, "cpu"), cu_seqlens(lens_k, "cpu")
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(sum(lens_q), 2, 16, generator=gen, dtype=torch.float64).requires_grad_()
    k, v = (torch.randn(sum(lens_k), 1, 16, generator=gen, dtype=torch.float64).requires_grad_() for _ in range(2))

    def attention(q, k, v):
        out, lse, _ = flashcore.flash_attn_varlen_func(q.float(), k.float(), v.float(), cu_q, cu_k, 5, 5, causal=True,
                                                       softcap=4.0, deterministic=deterministic,
                                                       return_attn_probs=True)
        return out.double(), lse.double()
    assert gradcheck_through_fp32(attention, (q, k, v))


def test_kept_plan_reruns_with_other_cu_seqlens():
    """Same shapes and max_seqlen, other cu_seqlens values: the second backward reuses the first one's plans (the
    kernels read the lengths on the device) and is right for its own lengths."""
    first = _inputs([10, 30, 0, 20], [10, 30, 5, 20], 2, 1, 64, torch.float16)
    second = _inputs([30, 0, 25, 5], [30, 20, 0, 15], 2, 1, 64, torch.float16)
    for args, _ in (first, second):
        args.update(max_seqlen_q=32, max_seqlen_k=32)
    _check(_grads(*first, causal=True), *first, causal=True)
    plans = len(host._plans)
    _check(_grads(*second, causal=True), *second, causal=True)
    assert len(host._plans) == plans, "the second call made new plans: it did not exercise the kept ones"


@pytest.mark.parametrize("options", [dict(causal=True), dict(window_size=(6, 2), softcap=3.0)],
                         ids=["causal", "window-softcap"])
def test_deterministic_runs_are_bit_identical(options):
    args, dout = _inputs([17, 0, 30, 1], [20, 3, 30, 1], 4, 2, 64, torch.float16)
    first = _grads(args, dout, deterministic=True, **options)
    second = _grads(args, dout, deterministic=True, **options)
    for a, b in zip(first, second):
        assert torch.equal(a.view(torch.int16), b.view(torch.int16))


def test_torch_compile_traces_the_backward():
    """fullgraph through the varlen custom ops (aot_eager: AOTAutograd traces forward and backward)."""
    args, dout = _inputs([9, 0, 14], [9, 5, 20], 2, 1, 64, torch.float32)
    compiled = torch.compile(lambda q, k, v: flashcore.flash_attn_varlen_func(
        q, k, v, args["cu_seqlens_q"], args["cu_seqlens_k"], 14, 20, causal=True), backend="aot_eager",
        fullgraph=True)
    compiled(args["q"], args["k"], args["v"]).backward(dout)
    traced = [args[name].grad for name in "qkv"]
    for name in "qkv":
        args[name].grad = None
    for a, b in zip(traced, _grads(args, dout, causal=True)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("arg", ["q", "k"])
def test_a_paged_call_requiring_grad_is_refused(arg):
    """No paged backward: a paged call that autograd would record raises, naming the argument and block_table."""
    args = make_paged([4, 9], [20, 9], 16, 2, 1, 64, torch.float16, "cpu")
    args[arg] = args[arg].clone().requires_grad_()
    with pytest.raises(NotImplementedError,
                       match=rf"flash_attn_varlen_func: {arg} requires grad(.|\n)*block_table(.|\n)*torch.no_grad"):
        flashcore.flash_attn_varlen_func(**args, causal=True)


@pytest.mark.parametrize("paged", [True, False], ids=["paged", "no_lse"])
def test_the_custom_op_called_directly_never_gives_a_wrong_gradient(paged):
    """torch.ops.flashcore.attn_varlen, below the public function's checks: a paged call, or one that kept no lse,
    raises in the backward."""
    args = make_paged([4, 9], [20, 9], 16, 2, 1, 64, torch.float16, "cpu") if paged else \
        make_varlen([4, 9], [20, 9], 2, 1, 64, torch.float16, "cpu")
    q = args["q"].clone().requires_grad_()
    out, _ = torch.ops.flashcore.attn_varlen(q, args["k"], args["v"], args["cu_seqlens_q"], args["cu_seqlens_k"],
                                             args["max_seqlen_q"], args["max_seqlen_k"], 0.125, True, -1, 0, 0.0,
                                             paged, None, args.get("block_table"))   # return_lse only when paged
    with pytest.raises(NotImplementedError, match="block_table" if paged else "return_lse"):
        out.sum().backward()


def test_row_offsets_beyond_int32_are_refused():
    """A sequence whose q (or dout) rows span 2^31 elements from its first row gets a clear error: the dK/dV kernel
    sweeps them with 32-bit offsets (meta tensors: nothing is allocated or launched)."""
    rows = 2**18 + 1                                             # rows x 64 heads x 128 > 2^31 elements
    q = torch.empty(rows, 64, 128, device="meta", dtype=torch.float16)
    k = torch.empty(16, 64, 128, device="meta", dtype=torch.float16)
    lse = torch.empty(64, rows, device="meta")
    cu_q, cu_k = (torch.empty(2, device="meta", dtype=torch.int32) for _ in range(2))
    with pytest.raises(ValueError, match="q: max_seqlen_q 262145 x row stride 8192 exceeds the backward kernels' "
                                         "32-bit row offsets"):
        host.varlen_attention_backward(q, q, k, k, q, lse, cu_q, cu_k, rows, 16, 0.1, False, -1, -1, 0.0)
