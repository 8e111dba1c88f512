"""No silently dropped gradients: until a backward exists for a call, a call that autograd would record (an input
requires grad, grad mode on) raises, naming the function and the argument; under torch.no_grad() or
torch.inference_mode() the same call runs. Cold (first call of a signature) and warm (a kept plan): the refusal is
not a once-per-signature check."""
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


CALLS = [("flash_attn_func", _dense, ["q", "k", "v"]),
         ("flash_attn_with_kvcache", _kvcache, ["q", "k_cache", "v_cache", "k", "v"])]
CASES = [pytest.param(name, make, arg, id=f"{name}-{arg}") for name, make, args in CALLS for arg in args]


@pytest.mark.parametrize("warm", [False, True], ids=["cold", "warm"])
@pytest.mark.parametrize("name,make,arg", CASES)
def test_an_input_requiring_grad_is_refused(name, make, arg, warm, device):
    function = getattr(flashcore, name)
    args = make(device)
    if warm:
        function(**args)                 # the signature's plan is kept
    else:
        dispatch.clear()
    args[arg] = args[arg].clone().requires_grad_()
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
