"""End to end training: the small GQA + RoPE decoder of tests/test_generation.py, random-initialised, trained with
Adam on a fixed synthetic corpus, once with FlashCore's attention (flash_attn_func, forward and backward kernels) and
once with PyTorch's SDPA, from the same weights on the same batches. The two loss curves must agree step by step
within the dtype's noise, the first step's gradients of every parameter too (what one step's update is made of:
Adam's first update is about lr * sign(grad), which would hide their size), and the loss must fall.

CPU: float32 through the interpreter against SDPA's math backend, 120 steps. GPU (-m gpu): bf16 activations against
SDPA's flash / cuDNN backends, 300 steps. Also: the attention under activation checkpointing (the same gradients,
bit for bit, with deterministic=True), under autocast (fp16 on the CPU, against SDPA under the same autocast),
and (GPU) a whole training step captured in a CUDA graph and replayed on new batches, against eager steps.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

import flashcore
from test_generation import HEADS_KV, HEADS_Q, VOCAB, decoder, make_weights, rope, rope_tables

BATCH, SEQLEN = 2, 24
CORPUS_SEED = 7
CPU_STEPS = 120         # (the interpreter: about 1 s a step on 2 cores)


def corpus(steps: int, batch: int, seqlen: int) -> torch.Tensor:
    """(steps, batch, seqlen + 1) tokens: noisy arithmetic sequences, learnable structure the loss can fall on."""
    g = torch.Generator().manual_seed(CORPUS_SEED)
    start = torch.randint(0, VOCAB, (steps, batch, 1), generator=g)
    stride = torch.randint(1, 5, (steps, batch, 1), generator=g)
    tokens = (start + stride * torch.arange(seqlen + 1)) % VOCAB
    noise = torch.rand(tokens.shape, generator=g) < 0.1
    return torch.where(noise, torch.randint(0, VOCAB, tokens.shape, generator=g), tokens)


def flashcore_attention(q, k, v):
    return flashcore.flash_attn_func(q, k, v, causal=True)


def deterministic_attention(q, k, v):
    """flashcore_attention with deterministic=True: bit-identical gradients run to run (deterministic=False may sum
    dq with atomics, whose order varies on a GPU, where attn_bwd.host.ATOMIC_DQ_ARCHS lists the card)."""
    return flashcore.flash_attn_func(q, k, v, causal=True, deterministic=True)


def sdpa_attention(q, k, v):
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                         enable_gqa=True)
    return out.transpose(1, 2)


def train(attention, steps: int, device, dtype, lr=3e-3):
    """(losses, first step's gradients): Adam on fp32 master weights, the decoder's activations in `dtype`
    (autocast on the GPU), rotary applied before the attention call."""
    weights = {name: w.to(device=device, dtype=torch.float32).requires_grad_() for name, w in make_weights().items()}
    optimizer = torch.optim.Adam(weights.values(), lr=lr)
    cos, sin = rope_tables(SEQLEN, torch.float32)
    cos, sin = cos.to(device), sin.to(device)
    positions = torch.arange(SEQLEN, device=device)

    def attend(layer, q, k, v):
        q = torch.stack([rope(x, positions, cos, sin) for x in q])
        k = torch.stack([rope(x, positions, cos, sin) for x in k])
        return attention(q.to(dtype), k.to(dtype), v.to(dtype)).to(q.dtype)

    losses, first_grads = [], None
    for batch in corpus(steps, BATCH, SEQLEN).to(device):
        with torch.autocast(device.type if isinstance(device, torch.device) else str(device).split(":")[0],
                            dtype=dtype, enabled=dtype != torch.float32):
            logits = decoder(weights, batch[:, :-1], attend)
        loss = F.cross_entropy(logits.float().reshape(-1, VOCAB), batch[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        if first_grads is None:
            first_grads = {n: w.grad.clone() for n, w in weights.items()}
        optimizer.step()
        losses.append(loss.item())
    return torch.tensor(losses), first_grads


def assert_same_training(ours, theirs, curve_rtol: float, grad_rtol: float) -> None:
    (losses, grads), (ref_losses, ref_grads) = ours, theirs
    assert torch.isfinite(losses).all()
    worst = ((losses - ref_losses).abs() / ref_losses.abs()).max().item()
    assert worst <= curve_rtol, f"loss curves differ by {worst:.3g} (relative) at worst"
    for name, grad in grads.items():
        error = (grad - ref_grads[name]).abs().max().item()
        assert error <= grad_rtol * ref_grads[name].abs().max().item(), f"first gradient of {name}: {error:.3g} off"
    assert ref_losses[-20:].mean() < 0.8 * ref_losses[:20].mean(), "the reference run did not learn"


def test_training_matches_sdpa_math_in_fp32(cpu_only):
    device = torch.device("cpu")
    ours = train(flashcore_attention, CPU_STEPS, device, torch.float32)
    with sdpa_kernel(SDPBackend.MATH):
        theirs = train(sdpa_attention, CPU_STEPS, device, torch.float32)
    assert_same_training(ours, theirs, curve_rtol=1e-5, grad_rtol=1e-4)   # (measured: 8e-7 on the curve)
    assert HEADS_Q // HEADS_KV > 1      # (the model is GQA: dK / dV reduce over the group)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", [SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION], ids=["flash", "cudnn"])
def test_training_matches_sdpa_in_bf16(backend):
    device = torch.device("cuda")
    ours = train(flashcore_attention, 300, device, torch.bfloat16)
    with sdpa_kernel(backend):
        theirs = train(sdpa_attention, 300, device, torch.bfloat16)
    assert_same_training(ours, theirs, curve_rtol=3e-2, grad_rtol=5e-2)


def checkpointed(attention):
    """`attention` under activation checkpointing: its forward recomputed in the backward pass."""
    return lambda q, k, v: checkpoint(attention, q, k, v, use_reentrant=False)


@pytest.mark.parametrize("device,dtype", [
    pytest.param("cpu", torch.float32, id="cpu-fp32"),
    pytest.param("cuda", torch.bfloat16, id="gpu-bf16", marks=pytest.mark.gpu),
])
def test_checkpointed_attention_gives_the_same_gradients(device, dtype, interpret):
    if device == "cpu" and not interpret:
        pytest.skip("the CPU case runs under TRITON_INTERPRET=1")
    device = torch.device(device)
    losses, grads = train(checkpointed(deterministic_attention), 3, device, dtype)
    ref_losses, ref_grads = train(deterministic_attention, 3, device, dtype)
    assert torch.equal(losses, ref_losses)
    assert all(torch.equal(grads[name], ref_grads[name]) for name in grads)


def test_training_under_autocast_matches_sdpa_under_autocast(cpu_only):
    """fp16 autocast on the CPU: the decoder's matmuls in fp16, so the attention gets fp16 q / k / v."""
    device = torch.device("cpu")
    ours = train(flashcore_attention, 12, device, torch.float16)
    with sdpa_kernel(SDPBackend.MATH):
        theirs = train(sdpa_attention, 12, device, torch.float16)
    losses, grads = ours
    ref_losses, ref_grads = theirs
    assert torch.isfinite(losses).all()
    # (measured on the CPU: 4.3e-4 on the curve, 2.3e-3 on the first gradients, relative)
    assert ((losses - ref_losses).abs() / ref_losses).max().item() <= 2e-3
    for name, grad in grads.items():
        assert (grad - ref_grads[name]).abs().max().item() <= 1e-2 * ref_grads[name].abs().max().item(), name


@pytest.mark.gpu
def test_a_training_step_captured_in_a_cuda_graph_replays_like_eager_steps():
    """Forward, backward and Adam's step captured once (PyTorch's whole-network recipe: warm-up on a side stream,
    static inputs, capturable Adam), replayed on new batches; eager steps from the same weights on the same batches
    give the same losses within bf16 noise."""
    device = torch.device("cuda")
    batches = corpus(8, BATCH, SEQLEN).to(device)
    cos, sin = (t.to(device) for t in rope_tables(SEQLEN, torch.float32))
    positions = torch.arange(SEQLEN, device=device)

    def attend(layer, q, k, v):
        q = torch.stack([rope(x, positions, cos, sin) for x in q])
        k = torch.stack([rope(x, positions, cos, sin) for x in k])
        return flashcore_attention(q.bfloat16(), k.bfloat16(), v.bfloat16()).to(q.dtype)

    def setup():
        weights = {n: w.to(device=device, dtype=torch.float32).requires_grad_() for n, w in make_weights().items()}
        return weights, torch.optim.Adam(weights.values(), lr=3e-3, capturable=True)

    def loss_of(weights, batch):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = decoder(weights, batch[:, :-1], attend)
        return F.cross_entropy(logits.float().reshape(-1, VOCAB), batch[:, 1:].reshape(-1))

    weights, optimizer = setup()
    eager = []
    for batch in batches:
        optimizer.zero_grad(set_to_none=True)
        loss = loss_of(weights, batch)
        loss.backward()
        optimizer.step()
        eager.append(loss.item())

    weights, optimizer = setup()
    static_batch = batches[0].clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):          # warm-up steps (compile, kept plans) on real batches, as the eager run
        for batch in batches[:3]:
            static_batch.copy_(batch)
            optimizer.zero_grad(set_to_none=True)
            loss_of(weights, static_batch).backward()
            optimizer.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    optimizer.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        static_loss = loss_of(weights, static_batch)
        static_loss.backward()
        optimizer.step()
    replayed = []
    for batch in batches[3:]:
        static_batch.copy_(batch)
        graph.replay()
        replayed.append(static_loss.item())
    replayed = torch.tensor(replayed)
    assert torch.isfinite(replayed).all()
    # (capture records without running: replay i is the step on batch 3 + i from the weights of 3 + i steps)
    assert ((replayed - torch.tensor(eager[3:])).abs() / torch.tensor(eager[3:])).max().item() <= 1e-2
