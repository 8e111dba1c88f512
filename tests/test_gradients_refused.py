"""No silently dropped gradients: until a backward exists for a call, a call that autograd would record (an input
requires grad, grad mode on) raises, naming the function and the argument; under torch.no_grad() or
torch.inference_mode() the same call runs. Cold (first call of a signature) and warm (a kept plan): the refusal is
not a once-per-signature check.

flash_attn_func and flash_attn_varlen_func over packed K/V have a backward for every feature they take (causal,
window, softcap, ALiBi, GQA/MQA; tests/test_backward.py and tests/test_backward_varlen.py check its values): such
calls run and record a grad_fn, cold and warm. flash_attn_with_kvcache and a paged flash_attn_varlen_func
(block_table) still refuse."""
from __future__ import annotations

import pytest
import torch

import flashcore
from flashcore import dispatch


def _dense(device):
    q, k, v = (torch.randn(1, 5, 2, 32, device=device, dtype=torch.float16) for _ in range(3))
    return dict(q=q, k=k, v=v, causal=True)


def _kvcache(device):
    return dict(q=torch.randn(1, 1, 2, 32, device=device, dtype=torch.float16),
                k_cache=torch.randn(1, 8, 2, 32, device=device, dtype=torch.float16),
                v_cache=torch.randn(1, 8, 2, 32, device=device, dtype=torch.float16),
                k=torch.randn(1, 1, 2, 32, device=device, dtype=torch.float16),
                v=torch.randn(1, 1, 2, 32, device=device, dtype=torch.float16), cache_seqlens=3)


def _varlen(device):
    q, k, v = (torch.randn(7, 2, 32, device=device, dtype=torch.float16) for _ in range(3))
    cu_seqlens = torch.tensor([0, 3, 7], dtype=torch.int32, device=device)
    return dict(q=q, k=k, v=v, cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens, max_seqlen_q=4, max_seqlen_k=4)


def _varlen_paged(device):
    """Two sequences of 5 and 4 keys in a paged cache of 4 blocks of 4 keys."""
    q = torch.randn(7, 2, 32, device=device, dtype=torch.float16)
    k_cache, v_cache = (torch.randn(4, 4, 2, 32, device=device, dtype=torch.float16) for _ in range(2))
    return dict(q=q, k=k_cache, v=v_cache, cu_seqlens_q=torch.tensor([0, 3, 7], dtype=torch.int32, device=device),
                cu_seqlens_k=torch.tensor([0, 5, 9], dtype=torch.int32, device=device), max_seqlen_q=4,
                max_seqlen_k=5, block_table=torch.tensor([[2, 0], [3, 1]], dtype=torch.int32, device=device))


def _varlen_every_feature(device):
    """flash_attn_varlen_func's backward options at once (GQA 2, window, softcap, per-sequence ALiBi)."""
    q = torch.randn(7, 4, 32, device=device, dtype=torch.float16)
    k, v = (torch.randn(11, 2, 32, device=device, dtype=torch.float16) for _ in range(2))
    return dict(q=q, k=k, v=v, cu_seqlens_q=torch.tensor([0, 3, 7], dtype=torch.int32, device=device),
                cu_seqlens_k=torch.tensor([0, 5, 11], dtype=torch.int32, device=device), max_seqlen_q=4,
                max_seqlen_k=6, window_size=(3, 1), softcap=4.0, alibi_slopes=torch.rand(2, 4, device=device),
                softmax_scale=0.2)


def _dense_every_feature(device):
    """Every option flash_attn_func's backward covers at once (GQA 2, window, softcap, ALiBi)."""
    q = torch.randn(2, 6, 4, 32, device=device, dtype=torch.float16)
    k, v = (torch.randn(2, 9, 2, 32, device=device, dtype=torch.float16) for _ in range(2))
    return dict(q=q, k=k, v=v, window_size=(3, 1), softcap=4.0,
                alibi_slopes=torch.rand(4, device=device), softmax_scale=0.2)


REFUSED = [("flash_attn_with_kvcache", _kvcache, ["q", "k_cache", "v_cache", "k", "v"]),
           ("flash_attn_varlen_func", _varlen_paged, ["q", "k", "v"])]
DIFFERENTIABLE = [("flash_attn_func", _dense, ["q", "k", "v"]),
                  ("flash_attn_func", _dense_every_feature, ["q", "k", "v"]),
                  ("flash_attn_varlen_func", _varlen, ["q", "k", "v"]),
                  ("flash_attn_varlen_func", _varlen_every_feature, ["q", "k", "v"])]
CALLS = REFUSED + DIFFERENTIABLE
CASES = [pytest.param(name, make, arg, id=f"{name}-{make.__name__}-{arg}") for name, make, args in CALLS
         for arg in args]
REFUSED_CASES = [pytest.param(name, make, arg, id=f"{name}-{arg}") for name, make, args in REFUSED for arg in args]
DIFFERENTIABLE_CASES = [pytest.param(name, make, arg, id=f"{make.__name__}-{arg}")
                        for name, make, args in DIFFERENTIABLE for arg in args]


def _with_grad(name, make, arg, warm: bool, device):
    """(the public function, its arguments with `arg` requiring grad), after a no-grad call of the same signature
    (warm: its plan is kept) or with every kept plan forgotten (cold)."""
    function = getattr(flashcore, name)
    args = make(device)
    if warm:
        function(**args)
    else:
        dispatch.clear()
    args[arg] = args[arg].clone().requires_grad_()
    return function, args


@pytest.mark.parametrize("warm", [False, True], ids=["cold", "warm"])
@pytest.mark.parametrize("name,make,arg", REFUSED_CASES)
def test_an_input_requiring_grad_is_refused(name, make, arg, warm, device):
    function, args = _with_grad(name, make, arg, warm, device)
    with pytest.raises(NotImplementedError, match=rf"{name}: {arg} requires grad(.|\n)*torch.no_grad\(\)"):
        function(**args)


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
@pytest.mark.parametrize("name,make,arg", CASES)
def test_no_grad_and_inference_mode_run_as_before(name, make, arg, mode, device):
    function = getattr(flashcore, name)
    args = make(device)
    expected = function(**{n: t.clone() if isinstance(t, torch.Tensor) else t for n, t in args.items()})
    args[arg] = args[arg].clone().requires_grad_()
    with mode():
        out = function(**args)
    assert not out.requires_grad
    assert torch.equal(out, expected)


@pytest.mark.parametrize("warm", [False, True], ids=["cold", "warm"])
@pytest.mark.parametrize("name,make,arg", DIFFERENTIABLE_CASES)
def test_differentiable_calls_record_their_backward(name, make, arg, warm, device):
    function, args = _with_grad(name, make, arg, warm, device)    # (warm: a grad call must not take the kept plan)
    out = function(**args)
    assert out.grad_fn is not None
    out.float().sum().backward()
    assert args[arg].grad is not None and args[arg].grad.shape == args[arg].shape
    assert torch.isfinite(args[arg].grad).all()
