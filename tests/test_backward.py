"""flash_attn_func's backward (ops/attn_bwd) on the CPU interpreter: dq, dk, dv against float64 autograd of
flashcore.reference.attention_ref, with a tolerance measured on PyTorch's own low-precision gradients (the same
reference autograd'ed in the inputs' dtype): `factor` times what it loses, plus a floor.

Both backward schemes on the gradient cases (the `deterministic` fixture: flash-attn's flag True, the dQ kernel;
False with the device listed in host.ATOMIC_DQ_ARCHS, atomic dQ summed by the dK/dV kernel); the packed functions
run the default's.

The kernels take fp16 / bf16 / fp32 only (no float64): torch.autograd.gradcheck runs on float64 leaves through the
fp32 (ieee) kernels, with a finite-difference step that fits fp32 forward evaluations. Also here:
the packed flash_attn_qkvpacked_func / flash_attn_kvpacked_func (views in, packed gradients out).
"""
from __future__ import annotations

import pytest
import torch

import flashcore
from flashcore import interface
from flashcore.device import arch
from flashcore.ops.attn_bwd import host as bwd_host
from flashcore.reference import attention_ref, grad_errors
from poison import poisoned_allocations

pytestmark = pytest.mark.usefixtures("cpu_only")

DTYPES = [pytest.param(torch.float16, id="fp16"), pytest.param(torch.float32, id="fp32")]


@pytest.fixture(params=[True, False], ids=["deterministic", "atomic"])
def deterministic(request, monkeypatch):
    """flash-attn's flag, in each backward scheme: True runs the dQ kernel; False runs atomic dQ, the device being
    listed in host.ATOMIC_DQ_ARCHS for the test (the cards where flash-attn's default runs it; none yet)."""
    if not request.param:
        monkeypatch.setattr(bwd_host, "ATOMIC_DQ_ARCHS", frozenset({arch()}))
    return request.param


@pytest.fixture(params=["pointers", "tma"])
def load_path(request, monkeypatch):
    """The dense backward's loads: pointers, or tensor descriptors (spec feature tma) with the device listed in
    host.TMA_ARCHS for the test (the cards whose backward loads through them; none yet)."""
    if request.param == "tma":
        monkeypatch.setattr(bwd_host, "TMA_ARCHS", frozenset({arch()}))
    return request.param


def _inputs(batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim, dtype, seed=0):
    """q (B, Sq, Hq, D), k, v (B, Sk, Hkv, D) leaves requiring grad, and an upstream gradient dout like q."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, seqlen_q, heads_q, head_dim, generator=gen).to(dtype)
    k = torch.randn(batch, seqlen_k, heads_kv, head_dim, generator=gen).to(dtype)
    v = torch.randn(batch, seqlen_k, heads_kv, head_dim, generator=gen).to(dtype)
    dout = torch.randn(batch, seqlen_q, heads_q, head_dim, generator=gen).to(dtype)
    return q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), dout


def assert_grads_close(grads, q, k, v, dout, factor: float = 4.0, reference=attention_ref, **kwargs) -> None:
    """Each gradient in its input's shape and dtype, finite, within factor * (what PyTorch loses in q's dtype)
    + floor of the float64 gradient (flashcore.reference.grad_errors); the floor scales with the gradient's size."""
    for grad, leaf in zip(grads, (q, k, v)):
        assert grad.shape == leaf.shape and grad.dtype == leaf.dtype, (grad.shape, grad.dtype)
    for (name, err, tol), grad in zip(grad_errors(grads, q, k, v, dout, factor, reference, **kwargs), grads):
        assert torch.isfinite(grad).all(), f"{name} has NaN or inf"
        assert err <= tol, f"{name}: max error {err:.3g} > {tol:.3g}"


def _grads(q, k, v, dout, **kwargs):
    out = flashcore.flash_attn_func(q, k, v, **kwargs)
    out.backward(dout)
    grads = [t.grad for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    return grads


# (batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim), options
CASES = [
    pytest.param((1, 40, 40, 2, 2, 64), {}, id="dense-d64"),
    pytest.param((2, 37, 45, 2, 2, 80), {}, id="dense-d80-ragged"),
    pytest.param((1, 40, 70, 2, 2, 64), dict(causal=True), id="causal-sq<sk"),
    pytest.param((1, 70, 40, 2, 2, 80), dict(causal=True), id="causal-sq>sk"),
    pytest.param((1, 33, 50, 8, 2, 64), dict(causal=True), id="gqa4-causal"),
    pytest.param((1, 20, 30, 14, 2, 64), {}, id="gqa7"),
    pytest.param((2, 25, 25, 3, 1, 64), dict(causal=True), id="mqa"),
    pytest.param((2, 37, 45, 3, 1, 96), dict(window_size=(7, 3)), id="mqa-d96-window"),
    pytest.param((1, 30, 30, 2, 2, 128), dict(softmax_scale=0.3), id="d128-scale"),
    pytest.param((1, 1, 1, 2, 2, 64), {}, id="seqlen1"),
    pytest.param((1, 1, 37, 2, 2, 64), dict(causal=True), id="one-query"),
    pytest.param((1, 50, 60, 2, 2, 64), dict(window_size=(7, 3)), id="window"),
    pytest.param((1, 60, 40, 2, 1, 64), dict(window_size=(5, -1), causal=True), id="window-causal-sq>sk"),
    pytest.param((1, 50, 60, 2, 2, 64), dict(softcap=2.0), id="softcap"),
    pytest.param((1, 50, 60, 2, 2, 64), dict(softcap=5.0, causal=True), id="softcap-causal"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,options", CASES)
def test_gradients_match_the_reference(shape, options, dtype, deterministic):
    """Every allocation poisoned: a dq row the atomic scheme's preprocess does not zero (or a gradient row nothing
    writes) shows as NaN."""
    q, k, v, dout = _inputs(*shape, dtype)
    with poisoned_allocations():
        grads = _grads(q, k, v, dout, deterministic=deterministic, **options)
    assert_grads_close(grads, q, k, v, dout, **options)


# the cases the descriptor path takes: a power-of-two head_dim (others take the pointer path)
POW2_CASES = [case for case in CASES if case.values[0][5] & (case.values[0][5] - 1) == 0]


@pytest.mark.parametrize("load_path", ["tma"], indirect=True)     # (the pointer path: the test above)
@pytest.mark.parametrize("shape,options", POW2_CASES)
def test_descriptor_path_gradients_match_the_reference(shape, options, deterministic, load_path):
    """q, dO, k, v tiles by (interpreted) bulk tensor copy, rows past each sequence's end zero-filled, in both
    schemes: the pointer path's tolerance. Poisoned allocations: a gradient row nothing writes shows as NaN."""
    q, k, v, dout = _inputs(*shape, torch.float16)
    call = bwd_host.call_of(q, k, False, False, False, False)
    assert bwd_host._spec(call, q, k, v, dout)["tma"], "the case takes the descriptor path"
    with poisoned_allocations():
        grads = _grads(q, k, v, dout, deterministic=deterministic, **options)
    assert_grads_close(grads, q, k, v, dout, **options)


def test_listing_a_card_for_descriptors_gets_plans_of_its_own(monkeypatch):
    """A kept plan holds its load path: the same signature after host.TMA_ARCHS lists the device builds descriptor
    plans (no dispatch.clear() in between), and unlisting it finds the pointer plans again."""
    built, real = [], bwd_host.launched_step
    monkeypatch.setattr(bwd_host, "launched_step", lambda kernel, grid, bind, tensors, descriptors, **static:
                        built.append(sorted(descriptors)) or real(kernel, grid, bind, tensors, descriptors, **static))
    q, k, v, dout = _inputs(1, 20, 30, 2, 1, 64, torch.float16)

    def plans_built_by_a_backward():
        built.clear()
        _grads(q, k, v, dout, causal=True, deterministic=True)
        return list(built)
    plans_built_by_a_backward()                                      # pointer plans, kept
    assert plans_built_by_a_backward() == []
    monkeypatch.setattr(bwd_host, "TMA_ARCHS", frozenset({arch()}))
    assert plans_built_by_a_backward() == [[], ["DOut", "K", "Q", "V"], ["DOut", "K", "Q", "V"]]
    monkeypatch.setattr(bwd_host, "TMA_ARCHS", frozenset())
    assert plans_built_by_a_backward() == []


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("per_batch", [False, True], ids=["slopes-per-head", "slopes-per-batch"])
def test_alibi_gradients(per_batch, dtype, deterministic):
    q, k, v, dout = _inputs(2, 40, 50, 4, 2, 64, dtype)
    slopes = torch.rand(2, 4) if per_batch else torch.rand(4)
    slopes.requires_grad_()
    options = dict(alibi_slopes=slopes, causal=True, deterministic=deterministic)
    assert_grads_close(_grads(q, k, v, dout, **options), q, k, v, dout, alibi_slopes=slopes.detach(), causal=True)
    assert slopes.grad is None, "ALiBi slopes get no gradient (flash-attn's behaviour)"


def test_long_causal_sequence(deterministic):
    q, k, v, dout = _inputs(1, 257, 257, 1, 1, 64, torch.float32)
    assert_grads_close(_grads(q, k, v, dout, causal=True, deterministic=deterministic), q, k, v, dout, causal=True)


def test_rows_without_keys_get_zero_gradients(deterministic):
    """causal with Sq > Sk: the first Sq - Sk rows see no key: their dq is exactly 0, nothing is NaN."""
    q, k, v, dout = _inputs(1, 50, 20, 2, 2, 64, torch.float32)
    with poisoned_allocations():
        dq, dk, dv = _grads(q, k, v, dout, causal=True, deterministic=deterministic)
    assert torch.equal(dq[:, :30], torch.zeros_like(dq[:, :30]))
    assert torch.isfinite(dk).all() and torch.isfinite(dv).all()


@pytest.mark.parametrize("seqlen_q,seqlen_k", [(0, 5), (5, 0)])
def test_empty_sequences_give_zero_gradients(seqlen_q, seqlen_k, deterministic):
    q, k, v, dout = _inputs(1, seqlen_q, seqlen_k, 2, 2, 64, torch.float32)
    for grad, leaf in zip(_grads(q, k, v, dout, deterministic=deterministic), (q, k, v)):
        assert grad.shape == leaf.shape and not grad.any()


@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_views_of_a_packed_qkv(dtype, deterministic):
    """q, k, v sliced out of one (B, S, 3, H, D) tensor: the gradient lands in the packed tensor's slices."""
    gen = torch.Generator().manual_seed(1)
    qkv = torch.randn(2, 30, 3, 4, 80, generator=gen).to(dtype).requires_grad_()
    dout = torch.randn(2, 30, 4, 80, generator=gen).to(dtype)
    q, k, v = qkv.unbind(2)
    flashcore.flash_attn_func(q, k, v, causal=True, deterministic=deterministic).backward(dout)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    assert_grads_close(list(qkv.grad.unbind(2)), *leaves, dout, causal=True)


def _spy_on_flash_attn_func(monkeypatch) -> list:
    """The (q, k, v) each flash_attn_func call of the packed functions receives."""
    seen, real = [], interface.flash_attn_func
    monkeypatch.setattr(interface, "flash_attn_func",
                        lambda q, k, v, *args, **kwargs: seen.append((q, k, v)) or real(q, k, v, *args, **kwargs))
    return seen


def _assert_views_of(packed, tensors) -> None:
    """Each tensor is packed[:, :, i] itself: same memory, same strides (no copy)."""
    for i, t in enumerate(tensors):
        assert t.data_ptr() == packed[:, :, i].data_ptr() and t.stride() == packed[:, :, i].stride(), "a copy"


@pytest.mark.parametrize("dtype", DTYPES)
def test_qkvpacked_func_passes_views_and_its_gradient_lands_in_qkv(dtype, monkeypatch):
    """flash_attn_qkvpacked_func: qkv (B, S, 3, H, D) reaches flash_attn_func as strided views, and backward() gives
    qkv.grad (B, S, 3, H, D) holding dq, dk, dv."""
    gen = torch.Generator().manual_seed(2)
    qkv = torch.randn(2, 30, 3, 4, 80, generator=gen).to(dtype).requires_grad_()
    dout = torch.randn(2, 30, 4, 80, generator=gen).to(dtype)
    seen = _spy_on_flash_attn_func(monkeypatch)
    with poisoned_allocations():
        flashcore.flash_attn_qkvpacked_func(qkv, 0.0, None, True, (9, -1)).backward(dout)
    _assert_views_of(qkv, seen[0])
    assert qkv.grad.shape == qkv.shape
    leaves = [t.detach().clone().requires_grad_() for t in qkv.unbind(2)]
    assert_grads_close(list(qkv.grad.unbind(2)), *leaves, dout, causal=True, window_size=(9, -1))


@pytest.mark.parametrize("dtype", DTYPES)
def test_kvpacked_func_passes_views_and_its_gradient_lands_in_kv(dtype, monkeypatch):
    """flash_attn_kvpacked_func with GQA 2, Sq < Sk, causal and softcap: kv (B, Sk, 2, Hkv, D) reaches
    flash_attn_func as strided views; q.grad and kv.grad (B, Sk, 2, Hkv, D) hold dq and dk, dv."""
    q, k, v, dout = _inputs(2, 37, 50, 4, 2, 64, dtype)
    kv = torch.stack([k.detach(), v.detach()], 2).requires_grad_()
    seen = _spy_on_flash_attn_func(monkeypatch)
    with poisoned_allocations():
        out, lse, probs = flashcore.flash_attn_kvpacked_func(q, kv, causal=True, softcap=6.0, return_attn_probs=True)
        out.backward(dout)
    assert seen[0][0] is q and probs is None and lse.shape == (2, 4, 37)
    _assert_views_of(kv, seen[0][1:])
    assert kv.grad.shape == kv.shape
    assert_grads_close([q.grad, *kv.grad.unbind(2)], q, k, v, dout, causal=True, softcap=6.0)


def test_lse_gradient(deterministic):
    """A loss that reads the returned lse: d lse / d scores = P enters the backward too."""
    q, k, v, dout = _inputs(1, 30, 40, 2, 2, 64, torch.float32)
    out, lse = flashcore.flash_attn_func(q, k, v, deterministic=deterministic, return_lse=True)
    ((out * dout).sum() + lse.square().sum()).backward()
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref_out, ref_lse = attention_ref(*leaves)
    ((ref_out * dout.double()).sum() + ref_lse.square().sum()).backward()
    for t, ref in zip((q, k, v), leaves):
        torch.testing.assert_close(t.grad.double(), ref.grad, atol=1e-4, rtol=1e-4)


def gradcheck_through_fp32(attention, inputs) -> bool:
    """torch.autograd.gradcheck (fast mode: one random projection of each Jacobian, out's and lse's, each also
    alone: its undefined-grad check) of `attention`, float64 leaves -> (out, lse) in float64, which runs the fp32
    kernels (ieee dots) on them. The finite-difference step is 0.1 along a unit direction (about 0.01 per element):
    smaller steps let the fp32 forward's rounding, divided by the step, swamp the difference (1e-2 relative at
    1e-3); at 0.1 the noise stays near 2e-4 relative, against 1e-2 for a gradient 1% off. Fast mode scales atol by
    the projections' sums (about 100 here): atol stays far below rtol's share."""
    return torch.autograd.gradcheck(attention, inputs, eps=0.1, atol=1e-8, rtol=1e-3, fast_mode=True)


def test_gradcheck_through_the_fp32_kernels(deterministic):
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(1, 6, 2, 16, generator=gen, dtype=torch.float64).requires_grad_()
    k, v = (torch.randn(1, 9, 1, 16, generator=gen, dtype=torch.float64).requires_grad_() for _ in range(2))

    def attention(q, k, v):
        out, lse = flashcore.flash_attn_func(q.float(), k.float(), v.float(), causal=True, window_size=(4, -1),
                                             softcap=4.0, deterministic=deterministic, return_lse=True)
        return out.double(), lse.double()
    assert gradcheck_through_fp32(attention, (q, k, v))


@pytest.mark.parametrize("options", [dict(causal=True), dict(window_size=(6, 2), softcap=3.0)],
                         ids=["causal", "window-softcap"])
def test_deterministic_runs_are_bit_identical(options):
    q, k, v, dout = _inputs(1, 45, 45, 4, 2, 64, torch.float16)
    first = _grads(q, k, v, dout, deterministic=True, **options)
    second = _grads(q, k, v, dout, deterministic=True, **options)
    for a, b in zip(first, second):
        assert torch.equal(a.view(torch.int16), b.view(torch.int16))


def _launched_kernels(monkeypatch, run) -> list[str]:
    """The kernels the backward's plans launch in `run()`, in order (its plans built afresh)."""
    from flashcore import dispatch
    names, real = [], bwd_host.launched_step
    monkeypatch.setattr(bwd_host, "launched_step", lambda kernel, *args, **kwargs:
                        names.append(kernel.__name__) or real(kernel, *args, **kwargs))
    dispatch.clear()                # (kept plans launch without being built again)
    run()
    return names


def test_each_scheme_runs_its_own_kernels(monkeypatch):
    """The dQ kernel's scheme: preprocess, dK/dV, dQ; atomic dQ's: preprocess, dK/dV (adding dq's parts with
    atomics), convert."""
    q, k, v, dout = _inputs(1, 20, 30, 2, 1, 64, torch.float16)

    def run(**options):
        flashcore.flash_attn_func(q, k, v, causal=True, **options).backward(dout)
    assert_schemes_launch(monkeypatch, run)


def assert_schemes_launch(monkeypatch, run) -> None:
    """run(deterministic=True) launches the dQ kernel's scheme wherever it runs; run(deterministic=False) and run()
    (flash-attn's default) the atomic scheme's on a device host.ATOMIC_DQ_ARCHS lists, else the dQ kernel's."""
    dq_kernel = ["attn_bwd_preprocess", "attn_bwd_dkdv", "attn_bwd_dq"]
    atomic = ["attn_bwd_preprocess", "attn_bwd_dkdv", "attn_bwd_dq_convert"]
    monkeypatch.setattr(bwd_host, "ATOMIC_DQ_ARCHS", frozenset())
    assert _launched_kernels(monkeypatch, lambda: run(deterministic=False)) == dq_kernel
    assert _launched_kernels(monkeypatch, run) == dq_kernel
    monkeypatch.setattr(bwd_host, "ATOMIC_DQ_ARCHS", frozenset({arch()}))
    assert _launched_kernels(monkeypatch, lambda: run(deterministic=True)) == dq_kernel
    assert _launched_kernels(monkeypatch, lambda: run(deterministic=False)) == atomic
    assert _launched_kernels(monkeypatch, run) == atomic, "deterministic=False is the default"


def test_no_grad_calls_take_the_fast_path_and_record_nothing():
    q, k, v, _ = _inputs(1, 20, 20, 2, 2, 64, torch.float32)
    with torch.no_grad():
        out = flashcore.flash_attn_func(q, k, v, causal=True)
    assert out.grad_fn is None
    assert flashcore.flash_attn_func(q, k, v, causal=True).grad_fn is not None


def test_torch_compile_traces_the_backward(deterministic):
    """fullgraph through the custom ops (aot_eager: AOTAutograd traces forward and backward, no C++ compile), the
    flag carried to the backward. (The interpreter runs programs in order, so the atomic scheme's sums repeat too.)"""
    q, k, v, dout = _inputs(1, 20, 20, 2, 2, 64, torch.float32)
    compiled = torch.compile(lambda q, k, v: flashcore.flash_attn_func(q, k, v, causal=True,
                                                                       deterministic=deterministic),
                             backend="aot_eager", fullgraph=True)
    compiled(q, k, v).backward(dout)
    traced = [t.grad for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    for a, b in zip(traced, _grads(q, k, v, dout, causal=True, deterministic=deterministic)):
        assert torch.equal(a, b)


def test_a_tuned_backward_config_that_fails_falls_back_to_the_default_with_one_warning(monkeypatch):
    """A record that passes every check and still fails its first launch (another driver or Triton) must not break
    training: one warning, the default config from then on, the right gradients."""
    from flashcore import dispatch
    from flashcore.ops.attn_bwd import host
    real = host._first_launches
    default_launches = []

    def failing_unless_default(steps, call, dlse):
        steps = list(steps)
        tiles = [static["BLOCK_M"] for _, _, _, static, _ in steps[1:]]
        if tiles != [host.DEFAULT_TILES[("cpu", 256)][kernel][0] for kernel in host.KERNELS]:
            raise RuntimeError("out of resources")
        default_launches.append(tiles)
        return real(steps, call, dlse)
    tuned = {**host.default_config(host.spec_of(host.call_of(*_inputs(1, 8, 8, 2, 2, 32, torch.float16)[:2],
                                                             True, False, False, False), 0)), "dq.BLOCK_M": 16}
    monkeypatch.setattr(host, "_first_launches", failing_unless_default)
    monkeypatch.setattr(dispatch, "config_for", lambda op, spec, bucket: tuned if op.name == "attn_bwd"
                        else op.default_config(spec))
    dispatch.clear()
    dispatch.forget_warnings()
    q, k, v, dout = _inputs(1, 37, 41, 2, 2, 32, torch.float16, seed=5)
    try:
        with pytest.warns(UserWarning, match="failed .*out of resources.*using the default config"):
            grads = _grads(q, k, v, dout, causal=True)
        assert_grads_close(grads, q, k, v, dout, causal=True)
        assert len(default_launches) == 1
    finally:
        dispatch.clear()            # (the default it settled on for this spec, and the kept plans)


def test_training_calls_check_their_tensors_on_a_signatures_first_call_only(monkeypatch):
    """A call autograd records goes through the custom op; its tensor checks are the eager path's, once per call
    signature (host time per training step), and a bad tensor still gets the clear error at the call."""
    checked = []
    real = interface._check_tensors

    def counting(*args):
        checked.append(args[0].shape)
        real(*args)
    monkeypatch.setattr(interface, "_check_tensors", counting)
    for _ in range(3):
        q, k, v, dout = _inputs(1, 19, 23, 2, 1, 32, torch.float16)
        flashcore.flash_attn_func(q, k, v, causal=True).backward(dout)
    assert len(checked) == 1
    q, k, v, _ = _inputs(1, 19, 23, 2, 3, 32, torch.float16)
    with pytest.raises(ValueError, match="multiple of the number of key/value heads"):
        flashcore.flash_attn_func(q, k, v)
    with pytest.raises(TypeError, match="k must be a torch.Tensor"):
        flashcore.flash_attn_func(q, [1.0], v)
