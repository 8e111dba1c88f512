"""GPU suite of the backward (marker `gpu`): flash_attn_func's and flash_attn_varlen_func's kernels compiled for the
card (bf16 and fp16, GQA 32/8, head dims 64 / 128 / 256, causal with Sq != Sk, window, softcap; varlen batches of
mixed lengths with empty and single-token sequences), gradients against float64 autograd of the reference with
tests/test_backward.py's tolerance rule, in both backward schemes (test_backward's `deterministic` fixture: the dQ
kernel and atomic dQ) and, for the dense cases, both load paths (its `load_path` fixture: pointers, and tensor
descriptors with the card listed in host.TMA_ARCHS); deterministic=True bit-identical run to run; forward and
backward through torch.compile(fullgraph=True) matching eager. The atomic scheme's and the descriptor path's cases
have not run on a card yet (2026-12-08)."""
from __future__ import annotations

import pytest
import torch

import flashcore
from flashcore.reference import varlen_ref
from test_backward import _grads, assert_grads_close, deterministic, load_path  # noqa: F401 (fixtures)
from test_varlen import make_varlen

pytestmark = pytest.mark.gpu

DEV = "cuda"


def _inputs(batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim, dtype):
    q = torch.randn(batch, seqlen_q, heads_q, head_dim, device=DEV, dtype=dtype).requires_grad_()
    k = torch.randn(batch, seqlen_k, heads_kv, head_dim, device=DEV, dtype=dtype).requires_grad_()
    v = torch.randn(batch, seqlen_k, heads_kv, head_dim, device=DEV, dtype=dtype).requires_grad_()
    return q, k, v, torch.randn_like(q)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("shape,options", [
    pytest.param((2, 1000, 1000, 32, 8, 128), dict(causal=True), id="gqa4-d128-causal"),
    pytest.param((1, 300, 1100, 32, 8, 128), dict(causal=True), id="causal-sq<sk"),
    pytest.param((1, 700, 257, 8, 8, 64), dict(causal=True), id="causal-sq>sk-d64"),
    pytest.param((1, 513, 513, 8, 2, 256), dict(window_size=(100, 0), softcap=30.0), id="d256-window-softcap"),
])
def test_gradients_match_the_reference(shape, options, dtype, deterministic, load_path):
    q, k, v, dout = _inputs(*shape, dtype)
    assert_grads_close(_grads(q, k, v, dout, deterministic=deterministic, **options), q, k, v, dout, **options)


def test_backward_is_deterministic():
    q, k, v, dout = _inputs(2, 777, 777, 32, 8, 128, torch.bfloat16)
    first = _grads(q, k, v, dout, causal=True, deterministic=True)
    second = _grads(q, k, v, dout, causal=True, deterministic=True)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_compiled_forward_backward_matches_eager():
    """flash_attn_func under torch.compile(fullgraph=True), then backward through the compiled graph: the output
    and the gradients are the eager call's, bit for bit (deterministic=True: the atomic scheme's dq varies)."""
    import torch._dynamo
    torch._dynamo.reset()
    q, k, v, dout = _inputs(1, 512, 512, 16, 4, 128, torch.bfloat16)
    eager_out = flashcore.flash_attn_func(q, k, v, causal=True, deterministic=True)
    eager_out.backward(dout)
    eager_grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    compiled = torch.compile(lambda q, k, v: flashcore.flash_attn_func(q, k, v, causal=True, deterministic=True),
                             fullgraph=True)
    out = compiled(q, k, v)
    out.backward(dout)
    assert torch.equal(out, eager_out)
    assert all(torch.equal(t.grad, g) for t, g in zip((q, k, v), eager_grads))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("lens_q,lens_k,options", [
    pytest.param([700, 0, 1, 1500, 64], [700, 0, 1, 1500, 64], dict(causal=True), id="mixed-causal"),
    pytest.param([300, 1, 513], [1100, 9, 257], dict(causal=True), id="chunks-causal"),
    pytest.param([300, 1, 513], [1100, 9, 257], dict(window_size=(100, 0), softcap=30.0), id="window-softcap"),
])
def test_varlen_gradients_match_the_reference(lens_q, lens_k, options, dtype, deterministic):
    args = make_varlen(lens_q, lens_k, 32, 8, 128, dtype, DEV)
    for name in "qkv":
        args[name].requires_grad_()
    dout = torch.randn_like(args["q"])
    flashcore.flash_attn_varlen_func(**args, deterministic=deterministic, **options).backward(dout)
    grads = [args[name].grad for name in "qkv"]
    assert_grads_close(grads, args["q"], args["k"], args["v"], dout, reference=varlen_ref,
                       cu_seqlens_q=args["cu_seqlens_q"], cu_seqlens_k=args["cu_seqlens_k"], **options)
