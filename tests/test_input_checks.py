"""Every input check of flash_attn_func: the right exception type, and a message that names the argument.

These never launch a kernel (the checks run first), except the few tests that show valid edge values pass.
"""
from __future__ import annotations

import math

import pytest
import torch

import flashcore
from flashcore import checks


def qkv(device, batch=1, seqlen_q=8, seqlen_k=8, heads_q=2, heads_kv=2, head_dim=64, dtype=torch.float16):
    q = torch.randn(batch, seqlen_q, heads_q, head_dim, device=device).to(dtype)
    k = torch.randn(batch, seqlen_k, heads_kv, head_dim, device=device).to(dtype)
    v = torch.randn(batch, seqlen_k, heads_kv, head_dim, device=device).to(dtype)
    return q, k, v


# ---------------------------------------------------------------------------------------------------------------
# tensors

@pytest.mark.parametrize("which", ["q", "k", "v"])
def test_not_a_tensor(which, device):
    args = dict(zip("qkv", qkv(device)))
    args[which] = args[which].tolist()
    with pytest.raises(TypeError, match=rf"^{which} must be a torch.Tensor"):
        flashcore.flash_attn_func(**args)


@pytest.mark.parametrize("which", ["q", "k", "v"])
@pytest.mark.parametrize("rank", [3, 5])
def test_wrong_rank(which, rank, device):
    args = dict(zip("qkv", qkv(device)))
    t = args[which]
    args[which] = t.reshape(t.shape[0] * t.shape[1], *t.shape[2:]) if rank == 3 else t.unsqueeze(0)
    with pytest.raises(ValueError, match=rf"^{which} must have 4 dimensions"):
        flashcore.flash_attn_func(**args)


@pytest.mark.parametrize("which", ["q", "k", "v"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.int32, torch.int8, torch.bool, torch.complex64])
def test_unsupported_dtype(which, dtype, device):
    args = {name: t.to(dtype) for name, t in zip("qkv", qkv(device))}   # all wrong: q is named first
    with pytest.raises(TypeError, match=r"^q must be float16, bfloat16 or float32"):
        flashcore.flash_attn_func(**args)
    # only one of them wrong: that one is named
    args = dict(zip("qkv", qkv(device)))
    args[which] = args[which].to(dtype)
    with pytest.raises(TypeError, match=rf"^{which} must be float16, bfloat16 or float32"):
        flashcore.flash_attn_func(**args)


@pytest.mark.parametrize("which,other", [("k", torch.float32), ("v", torch.float32), ("k", torch.bfloat16),
                                         ("v", torch.bfloat16)])
def test_mismatched_dtypes(which, other, device):
    args = dict(zip("qkv", qkv(device, dtype=torch.float16)))
    args[which] = args[which].to(other)
    with pytest.raises(TypeError, match=rf"^{which} has dtype {other} but q has torch.float16"):
        flashcore.flash_attn_func(**args)


def test_q_dtype_differs_from_kv(device):
    q, k, v = qkv(device)
    with pytest.raises(TypeError, match=r"^k has dtype torch.float16 but q has torch.float32"):
        flashcore.flash_attn_func(q.float(), k, v)


@pytest.mark.parametrize("which", ["q", "k", "v"])
def test_wrong_device_interpreter(which, device, monkeypatch):
    """Under TRITON_INTERPRET=1 kernels run on the CPU: a tensor elsewhere (meta here, CUDA alike) is rejected."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    args = dict(zip("qkv", qkv("cpu")))
    args[which] = args[which].to("meta")
    with pytest.raises(ValueError, match=rf"^{which} is on meta, but TRITON_INTERPRET=1 runs kernels on the CPU"):
        flashcore.flash_attn_func(**args)


@pytest.mark.gpu
def test_cuda_tensor_in_interpreter_mode(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    q, k, v = qkv("cpu")
    with pytest.raises(ValueError, match=r"^q is on cuda"):
        flashcore.flash_attn_func(q.cuda(), k, v)


def test_cpu_tensor_without_interpreter(monkeypatch):
    """Without the interpreter kernels need CUDA: a CPU tensor is rejected before anything launches."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match=r"^q is on cpu; FlashCore kernels need CUDA tensors"):
        flashcore.flash_attn_func(*qkv("cpu"))


@pytest.mark.gpu
@pytest.mark.parametrize("which", ["k", "v"])
def test_cpu_kv_without_interpreter(which, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    args = dict(zip("qkv", qkv("cuda")))
    args[which] = args[which].cpu()
    with pytest.raises(ValueError, match=rf"^{which} is on cpu; FlashCore kernels need CUDA tensors"):
        flashcore.flash_attn_func(**args)


@pytest.mark.parametrize("which", ["k", "v"])
def test_mismatched_devices(which, device):
    """q on the kernel device, k or v elsewhere: the stray one is named."""
    args = dict(zip("qkv", qkv(device)))
    args[which] = args[which].to("meta")   # meta works everywhere, no second GPU needed
    with pytest.raises(ValueError, match=rf"^{which} is on meta"):
        flashcore.flash_attn_func(**args)


def test_check_same_devices_direct():
    """check_same's own device comparison (reachable on multi-GPU machines: cuda:0 vs cuda:1)."""
    a = torch.zeros(1, 1, 1, 16)
    b = torch.zeros(1, 1, 1, 16, device="meta")
    with pytest.raises(ValueError, match=r"^k is on meta but q is on cpu"):
        checks.check_same(("q", "k"), (a, b))
    with pytest.raises(TypeError, match=r"^v has dtype torch.float16 but q has torch.float32"):
        checks.check_same(("q", "v"), (a, a.half()))


@pytest.mark.parametrize("which", ["q", "k", "v"])
def test_non_unit_last_stride(which, device):
    args = dict(zip("qkv", qkv(device, head_dim=128)))
    args = {name: t[..., :64] for name, t in args.items()}      # unit stride, just narrower: fine for the check
    args[which] = torch.randn(*args[which].shape[:-1], 128, device=device).to(torch.float16)[..., ::2]
    assert args[which].stride(-1) == 2 and args[which].shape[-1] == 64
    with pytest.raises(ValueError, match=rf"^{which} must be contiguous in its last dimension \(head_dim\)"):
        flashcore.flash_attn_func(**args)


def test_transposed_head_dim(device):
    """(B, S, D, H) memory viewed as (B, S, H, D): head_dim stride != 1."""
    q, k, v = qkv(device)
    q = q.transpose(2, 3).contiguous().transpose(2, 3)
    with pytest.raises(ValueError, match=r"^q must be contiguous in its last dimension"):
        flashcore.flash_attn_func(q, k, v)


# ---------------------------------------------------------------------------------------------------------------
# shapes that must agree

def test_k_v_shape_mismatch(device):
    q, k, v = qkv(device)
    with pytest.raises(ValueError, match=r"^k and v must have the same shape"):
        flashcore.flash_attn_func(q, k, v[:, :5])
    with pytest.raises(ValueError, match=r"^k and v must have the same shape"):
        flashcore.flash_attn_func(q, k, torch.cat([v, v], dim=2))


def test_batch_mismatch(device):
    q, _, _ = qkv(device, batch=2)
    _, k, v = qkv(device, batch=3)
    with pytest.raises(ValueError, match=r"^batch size mismatch: q has 2, k and v have 3"):
        flashcore.flash_attn_func(q, k, v)


def test_head_dim_mismatch(device):
    q, _, _ = qkv(device, head_dim=64)
    _, k, v = qkv(device, head_dim=128)
    with pytest.raises(ValueError, match=r"^head_dim mismatch: q has 64, k and v have 128"):
        flashcore.flash_attn_func(q, k, v)


@pytest.mark.parametrize("head_dim", [0, 1, 8, 12, 15, 100, 130, 260, 264, 512])
def test_unsupported_head_dim(head_dim, device):
    q, k, v = qkv(device, head_dim=head_dim)
    with pytest.raises(ValueError, match=rf"^head_dim must be a multiple of 8 in \[16, 256\], got {head_dim}"):
        flashcore.flash_attn_func(q, k, v)


@pytest.mark.parametrize("heads_q,heads_kv", [(3, 2), (4, 3), (2, 4), (7, 2), (1, 2)])
def test_heads_not_multiple(heads_q, heads_kv, device):
    q, k, v = qkv(device, heads_q=heads_q, heads_kv=heads_kv)
    with pytest.raises(ValueError, match=rf"number of query heads \({heads_q}\) must be a multiple of the "
                                         rf"number of key/value heads \({heads_kv}\)"):
        flashcore.flash_attn_func(q, k, v)


def test_zero_kv_heads(device):
    q, k, v = qkv(device, heads_q=2, heads_kv=0)
    with pytest.raises(ValueError, match=r"key/value heads \(0\)"):
        flashcore.flash_attn_func(q, k, v)


# ---------------------------------------------------------------------------------------------------------------
# scalar arguments

@pytest.mark.parametrize("scale,exc", [
    (0, ValueError), (0.0, ValueError), (-1, ValueError), (-0.5, ValueError), (math.nan, ValueError),
    (math.inf, ValueError), (-math.inf, ValueError),
    ("x", TypeError), ("0.1", TypeError), (True, TypeError), ([0.1], TypeError), (torch.tensor(0.1), TypeError),
])
def test_bad_softmax_scale(scale, exc, device):
    q, k, v = qkv(device)
    with pytest.raises(exc, match=r"^softmax_scale must be"):
        flashcore.flash_attn_func(q, k, v, softmax_scale=scale)


@pytest.mark.parametrize("window,exc", [
    ((-2, 0), ValueError), ((0, -2), ValueError), ((-5, -5), ValueError),
    ((1,), TypeError), ((1, 2, 3), TypeError), ((), TypeError), ("a", TypeError), ("ab", TypeError),
    (5, TypeError), (None, TypeError), ((1.0, 2), TypeError), ((1, 2.5), TypeError), ((True, 0), TypeError),
    ((0, False), TypeError), (("1", 2), TypeError), ({1, 2}, TypeError),
])
def test_bad_window(window, exc, device):
    q, k, v = qkv(device)
    with pytest.raises(exc, match=r"^window_size"):
        flashcore.flash_attn_func(q, k, v, window_size=window)


def test_bad_window_names_the_side(device):
    q, k, v = qkv(device)
    with pytest.raises(ValueError, match=r"^window_size left must be >= 0, or -1 for unbounded, got -2"):
        flashcore.flash_attn_func(q, k, v, window_size=(-2, 0))
    with pytest.raises(ValueError, match=r"^window_size right must be >= 0, or -1 for unbounded, got -3"):
        flashcore.flash_attn_func(q, k, v, window_size=(4, -3))


@pytest.mark.parametrize("softcap,exc", [
    (-1, ValueError), (-0.1, ValueError), (math.nan, ValueError), (math.inf, ValueError),
    ("x", TypeError), (None, TypeError), (True, TypeError), ([1.0], TypeError),
])
def test_bad_softcap(softcap, exc, device):
    q, k, v = qkv(device)
    with pytest.raises(exc, match=r"^softcap must be"):
        flashcore.flash_attn_func(q, k, v, softcap=softcap)


@pytest.mark.parametrize("causal", [1, 0, "true", None, 1.0, torch.tensor(True)])
def test_causal_not_bool(causal, device):
    q, k, v = qkv(device)
    with pytest.raises(TypeError, match=r"^causal must be a bool"):
        flashcore.flash_attn_func(q, k, v, causal=causal)


def test_checks_run_before_any_kernel(device, monkeypatch):
    """A bad argument never reaches the kernel launch."""
    import flashcore.interface as interface

    def boom(*args, **kwargs):
        raise AssertionError("kernel op called despite invalid input")

    monkeypatch.setattr(interface, "_attn_fwd_op", boom)
    q, k, v = qkv(device)
    for kwargs in (dict(softmax_scale=-1.0), dict(window_size=(-2, 0)), dict(softcap=-1.0), dict(causal=1)):
        with pytest.raises((ValueError, TypeError)):
            flashcore.flash_attn_func(q, k, v, **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# a signature seen before: its tensors' checks are skipped, never anything they would have refused

@pytest.fixture
def counted_tensor_checks(monkeypatch):
    """How often flash_attn_func's tensor checks ran (they still run)."""
    calls = []
    real = checks.check_attention_inputs

    def counting(q, k, v):
        calls.append(1)
        real(q, k, v)

    monkeypatch.setattr(checks, "check_attention_inputs", counting)
    return calls


def test_tensor_checks_run_once_per_signature(device, counted_tensor_checks):
    q, k, v = qkv(device, head_dim=16)
    for _ in range(3):
        flashcore.flash_attn_func(q, k, v, causal=True)
    q2, k2, v2 = qkv(device, head_dim=16)     # other tensors, same signature
    flashcore.flash_attn_func(q2, k2, v2, causal=True)
    assert len(counted_tensor_checks) == 1
    flashcore.flash_attn_func(q, k, torch.cat([v, v], dim=2)[:, :, :2], causal=True)   # v with other strides
    assert len(counted_tensor_checks) == 2


@pytest.mark.parametrize("bad", ["v_shape", "k_dtype", "v_device", "v_last_stride", "alibi_dtype"])
def test_a_tensor_fact_outside_a_seen_signature_is_checked(bad, device):
    """After a valid call, the same call with one tensor fact changed gets that fact's error."""
    q, k, v = qkv(device, head_dim=32)
    slopes = torch.rand(2, device=device)
    flashcore.flash_attn_func(q, k, v, alibi_slopes=slopes)
    if bad == "v_shape":
        v, error = v[:, :5], r"^k and v must have the same shape"
    elif bad == "k_dtype":
        k, error = k.float(), r"^k has dtype torch.float32 but q has torch.float16"
    elif bad == "v_device":
        v, error = v.to("meta"), r"^v is on meta"
    elif bad == "v_last_stride":
        v, error = torch.randn(1, 8, 2, 64, device=device).half()[..., ::2], r"^v must be contiguous in its last"
    else:
        slopes, error = slopes.double(), r"^alibi_slopes must be float32"
    with pytest.raises((TypeError, ValueError), match=error):
        flashcore.flash_attn_func(q, k, v, alibi_slopes=slopes)


@pytest.mark.parametrize("valid,bad,error", [
    (dict(causal=True), dict(causal=1), r"^causal must be a bool"),
    (dict(return_lse=False), dict(return_lse=0), r"^return_lse must be a bool"),
    (dict(window_size=(1, 0)), dict(window_size=(True, 0)), r"^window_size must be a pair of ints"),
    (dict(window_size=(1, 0)), dict(window_size=(1.0, 0)), r"^window_size must be a pair of ints"),
    (dict(softcap=0.0), dict(softcap=False), r"^softcap must be"),
    (dict(softmax_scale=0.25), dict(softmax_scale=torch.tensor(0.25)), r"^softmax_scale must be"),
    (dict(dropout_p=0.0), dict(dropout_p=False), r"^dropout_p must be a float"),
    (dict(causal=True, window_size=(4, 0)), dict(causal=True, window_size=(4, -3)), r"^window_size right"),
], ids=lambda x: ",".join(f"{k}={v}" for k, v in x.items()) if isinstance(x, dict) else "")
def test_a_bad_scalar_is_refused_on_a_seen_signature(valid, bad, error, device):
    """Scalars are checked on every call: values equal to valid ones (1 == True, 0.0 == False) and a bad window
    side that causal hides (its right side becomes 0) are refused after the valid call."""
    q, k, v = qkv(device, head_dim=16)
    flashcore.flash_attn_func(q, k, v, **valid)
    with pytest.raises((TypeError, ValueError), match=error):
        flashcore.flash_attn_func(q, k, v, **bad)


def test_interpreter_switched_off_after_a_call_refuses_cpu_tensors(device, monkeypatch, interpret):
    """TRITON_INTERPRET is part of the signature: the checks see the environment of this call."""
    if not interpret:
        pytest.skip("CPU tensors are valid only under the interpreter")
    q, k, v = qkv(device, head_dim=16)
    flashcore.flash_attn_func(q, k, v)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match=r"^q is on cpu; FlashCore kernels need CUDA tensors"):
        flashcore.flash_attn_func(q, k, v)


def test_non_tensor_after_a_seen_signature(device):
    """A list shaped like q after a valid call: the checks name it (its signature cannot be built)."""
    q, k, v = qkv(device, head_dim=16)
    flashcore.flash_attn_func(q, k, v)
    with pytest.raises(TypeError, match=r"^q must be a torch.Tensor, got list"):
        flashcore.flash_attn_func(q.tolist(), k, v)
    with pytest.raises(TypeError, match=r"^alibi_slopes must be a torch.Tensor or None, got list"):
        flashcore.flash_attn_func(q, k, v, alibi_slopes=[0.1, 0.2])


# ---------------------------------------------------------------------------------------------------------------
# valid edge values are accepted (these do launch small kernels)

@pytest.mark.parametrize("kwargs", [
    dict(softmax_scale=1), dict(softmax_scale=1e-3), dict(softmax_scale=None),
    dict(window_size=(-1, -1)), dict(window_size=(0, 0)), dict(window_size=[3, -1]),
    dict(softcap=0), dict(softcap=0.0), dict(softcap=50),
    dict(causal=True, window_size=(4, 7)),
], ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_valid_edge_values_accepted(kwargs, device):
    q, k, v = qkv(device, head_dim=16)
    out = flashcore.flash_attn_func(q, k, v, **kwargs)
    assert out.shape == q.shape and not torch.isnan(out).any()


@pytest.mark.parametrize("head_dim", [16, 24, 256])
def test_head_dim_bounds_accepted(head_dim, device):
    q, k, v = qkv(device, seqlen_q=3, seqlen_k=5, head_dim=head_dim)
    out = flashcore.flash_attn_func(q, k, v)
    assert out.shape == q.shape and not torch.isnan(out).any()


def test_row_offsets_beyond_int32_are_refused():
    """A (batch, head) slice spanning 2^31 elements gets a clear error instead of a wrapped 32-bit address."""
    from flashcore.ops.attn_fwd.host import attention_forward
    q = torch.empty(1, 2**18 + 1, 64, 128, device="meta", dtype=torch.float16)   # rows x 8192 > 2^31
    k = torch.empty(1, 16, 64, 128, device="meta", dtype=torch.float16)
    with pytest.raises(ValueError, match="32-bit row offsets"):
        attention_forward(q, k, k, 0.1, False, -1, -1, 0.0, False)
