"""flash-attn's flash_attn_func, argument for argument: positional order, dropout, ALiBi, deterministic,
return_attn_probs; windows at the int32 edge; a property test of the public forward over the feature space. The
packed variants flash_attn_qkvpacked_func / flash_attn_kvpacked_func: flash-attn's signatures and layout checks
(their values and gradients: tests/test_backward.py)."""
from __future__ import annotations

import inspect

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import flashcore
from flashcore.reference import assert_close_attention
from poison import poisoned_allocations

FLASH_ATTN_ARGS = ["q", "k", "v", "dropout_p", "softmax_scale", "causal", "window_size", "softcap", "alibi_slopes",
                   "deterministic", "return_attn_probs"]


def qkv(device, batch=2, seqlen_q=37, seqlen_k=50, heads_q=4, heads_kv=2, head_dim=64, dtype=torch.float16):
    q = torch.randn(batch, seqlen_q, heads_q, head_dim, device=device, dtype=dtype)
    k = torch.randn(batch, seqlen_k, heads_kv, head_dim, device=device, dtype=dtype)
    return q, k, torch.randn_like(k)


def test_signature_is_flash_attns_in_order():
    params = inspect.signature(flashcore.flash_attn_func).parameters
    positional = [n for n, p in params.items() if p.kind == p.POSITIONAL_OR_KEYWORD]
    assert positional == FLASH_ATTN_ARGS
    assert [n for n, p in params.items() if p.kind == p.KEYWORD_ONLY] == ["return_lse"]


@pytest.mark.parametrize("function,packed", [("flash_attn_qkvpacked_func", ["qkv"]),
                                              ("flash_attn_kvpacked_func", ["q", "kv"])])
def test_packed_signatures_are_flash_attns_in_order(function, packed):
    params = inspect.signature(getattr(flashcore, function)).parameters
    assert list(params) == packed + FLASH_ATTN_ARGS[3:]
    assert all(p.kind == p.POSITIONAL_OR_KEYWORD for p in params.values())
    dense = inspect.signature(flashcore.flash_attn_func).parameters
    assert {n: params[n].default for n in FLASH_ATTN_ARGS[3:]} == {n: dense[n].default for n in FLASH_ATTN_ARGS[3:]}


@pytest.mark.parametrize("function,make,match", [
    ("flash_attn_qkvpacked_func", lambda q, k, v: (torch.stack([q, k], 2),), r"qkv must have shape \(batch, seqlen, 3"),
    ("flash_attn_qkvpacked_func", lambda q, k, v: (q,), r"qkv must have shape \(batch, seqlen, 3"),
    ("flash_attn_kvpacked_func", lambda q, k, v: (q, torch.stack([k, v], 1)), r"kv must have shape \(batch, seqlen, 2"),
    ("flash_attn_kvpacked_func", lambda q, k, v: (q, k), r"kv must have shape \(batch, seqlen, 2"),
], ids=["qkv-two-parts", "qkv-unpacked", "kv-parts-second", "kv-unpacked"])
def test_packed_layouts_are_checked(function, make, match, device):
    with pytest.raises(ValueError, match=match):
        getattr(flashcore, function)(*make(*qkv(device, seqlen_k=37, heads_kv=4)))


def test_positional_arguments_mean_what_they_mean_in_flash_attn(device):
    q, k, v = qkv(device)
    slopes = torch.rand(4, device=device)
    out = flashcore.flash_attn_func(q, k, v, 0.0, 0.1, True, (20, -1), 5.0, slopes, True)
    assert_close_attention(out, q, k, v, softmax_scale=0.1, causal=True, window_size=(20, -1), softcap=5.0,
                           alibi_slopes=slopes)


def test_dropout_is_refused_not_ignored(device):
    q, k, v = qkv(device)
    with pytest.raises(NotImplementedError, match="dropout_p=0.1"):
        flashcore.flash_attn_func(q, k, v, 0.1)       # flash-attn's 4th positional: dropout, not the scale
    with pytest.raises(TypeError, match="dropout_p"):
        flashcore.flash_attn_func(q, k, v, dropout_p="0")


def test_return_attn_probs_returns_out_lse_none(device):
    q, k, v = qkv(device)
    out, lse, probs = flashcore.flash_attn_func(q, k, v, return_attn_probs=True, deterministic=True)
    assert probs is None
    assert_close_attention(out, q, k, v, lse=lse)


@pytest.mark.parametrize("shape", ["heads", "batch_heads"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_alibi(device, shape, causal):
    q, k, v = qkv(device, heads_q=6, heads_kv=2, seqlen_q=45, seqlen_k=45)
    slopes = torch.rand(*((6,) if shape == "heads" else (2, 6)), device=device) * 0.5
    with poisoned_allocations():
        out, lse = flashcore.flash_attn_func(q, k, v, causal=causal, alibi_slopes=slopes, return_lse=True)
    assert_close_attention(out, q, k, v, lse=lse, causal=causal, alibi_slopes=slopes)


@pytest.mark.parametrize("bad, error, match", [
    (torch.rand(5), ValueError, r"alibi_slopes must have shape \(4,\) or \(2, 4\)"),
    (torch.rand(4, dtype=torch.float64), TypeError, "alibi_slopes must be float32"),
    ([0.1] * 4, TypeError, "alibi_slopes must be a torch.Tensor"),
    (torch.rand(4, 2)[:, 0], ValueError, "contiguous over heads"),
])
def test_bad_alibi_slopes(device, bad, error, match):
    q, k, v = qkv(device)
    if isinstance(bad, torch.Tensor):
        bad = bad.to(device)
    with pytest.raises(error, match=match):
        flashcore.flash_attn_func(q, k, v, alibi_slopes=bad)


@pytest.mark.parametrize("window", [(0, 2**31 - 1), (2**31 - 1, 2**31 - 1), (2**31 - 1, 0), (2**40, 3)])
def test_window_sides_at_and_past_int32(device, window):
    q, k, v = qkv(device)
    with poisoned_allocations():
        out = flashcore.flash_attn_func(q, k, v, window_size=window)
    assert_close_attention(out, q, k, v, window_size=window)


def test_bf16_under_the_interpreter_is_an_error_not_garbage(cpu_only):
    q, k, v = qkv("cpu", dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="are bfloat16, which the Triton interpreter"):
        flashcore.flash_attn_func(q, k, v)


def test_a_tuned_config_that_fails_falls_back_to_the_default_with_one_warning(device, monkeypatch):
    from flashcore import dispatch
    from flashcore.ops.attn_fwd import host
    real = host._launch_plan
    default_configs = []

    def failing_unless_default(spec, config, *args):
        if config != host.default_config(spec):
            raise RuntimeError("out of resources")
        default_configs.append(config)
        return real(spec, config, *args)
    monkeypatch.setattr(host, "_launch_plan", failing_unless_default)
    monkeypatch.setattr(dispatch, "config_for", lambda op, spec, bucket: {**host.default_config(spec), "BLOCK_M": 16})
    dispatch.forget_warnings()
    q, k, v = qkv(device, seqlen_q=19, seqlen_k=23)
    with pytest.warns(UserWarning, match="failed .*out of resources.*using the default config"):
        out = flashcore.flash_attn_func(q, k, v, 0.0, 0.3)
    assert_close_attention(out, q, k, v, softmax_scale=0.3)
    assert len(default_configs) == 1


# ------------------------------------------------------------------------------------------------ property

DTYPES = st.sampled_from([torch.float16, torch.float32])


@st.composite
def problems(draw, dtypes=DTYPES):
    heads_kv = draw(st.integers(1, 2))
    return dict(
        batch=draw(st.integers(1, 2)), seqlen_q=draw(st.integers(1, 70)), seqlen_k=draw(st.integers(0, 70)),
        heads_kv=heads_kv, heads_q=heads_kv * draw(st.sampled_from([1, 3, 7])),
        head_dim=draw(st.sampled_from([16, 32, 48, 64, 80, 96])), dtype=draw(dtypes),
        causal=draw(st.booleans()),
        window=(draw(st.sampled_from([-1, -1, 0, 7, 2**31 - 1])), draw(st.sampled_from([-1, -1, 0, 5]))),
        softcap=draw(st.sampled_from([0.0, 0.0, 8.0])), alibi=draw(st.sampled_from([None, None, "heads", "batch"])),
        scale=draw(st.sampled_from([None, 0.05, 0.3])))


def check_problem(p, device):
    q, k, v = qkv(device, p["batch"], p["seqlen_q"], p["seqlen_k"], p["heads_q"], p["heads_kv"], p["head_dim"],
                  p["dtype"])
    slopes = None if p["alibi"] is None else torch.rand(
        *((p["heads_q"],) if p["alibi"] == "heads" else (p["batch"], p["heads_q"])), device=device)
    kwargs = dict(softmax_scale=p["scale"], causal=p["causal"], window_size=p["window"], softcap=p["softcap"],
                  alibi_slopes=slopes)
    with poisoned_allocations():
        out, lse = flashcore.flash_attn_func(q, k, v, return_lse=True, **kwargs)
    assert_close_attention(out, q, k, v, lse=lse, **kwargs)


@pytest.mark.usefixtures("cpu_only")
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(p=problems())
def test_public_forward_property(p):
    check_problem(p, "cpu")


@pytest.mark.gpu
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(p=problems(dtypes=st.sampled_from([torch.bfloat16, torch.float16])))
def test_public_forward_property_gpu(p):
    check_problem(p, "cuda")
