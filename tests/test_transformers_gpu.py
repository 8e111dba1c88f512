"""flashcore.integrations.transformers on the GPU: a randomly initialised 1B-class Llama (16 layers, hidden 2048, 32
query heads over 8 kv heads of 64, vocab 32000; no download) in bf16 with attn_implementation="flashcore" against
"sdpa" on the same weights: logits on padded batches, greedy generate() with and without padding, the gradients of
a training step; and the time per generated token beside "sdpa" (and "flash_attention_2" where flash-attn is
installed), printed, never asserted.

bf16 bounds are measured, not guessed: a copy of the model in fp32 under "eager" is the truth, and FlashCore's
error against it may be at most twice SDPA's bf16 error plus a small slack (flash-attn's rule for its own tests).
Both errors are mostly the bf16 rounding of the rest of the model; an attention that gets the mask, causality or a
gradient wrong is off by the size of the logits (or gradients) themselves.

    pytest -s -m gpu tests/test_transformers_gpu.py      # FLASHCORE_OUT=dir also writes dir/hf-generate.json
"""
from __future__ import annotations

import copy
import json
import os
import time

import pytest

transformers = pytest.importorskip("transformers")

import torch  # noqa: E402
from test_transformers_integration import padding_mask, run  # noqa: E402

from flashcore.integrations.transformers import ATTN_IMPLEMENTATION  # noqa: E402

pytestmark = pytest.mark.gpu

LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, head_dim=64, vocab_size=32000, max_position_embeddings=4096, pad_token_id=0,
                eos_token_id=None)
SLACK = 1e-3        # x the reference's largest magnitude: room for a reference SDPA happens to match closely


@pytest.fixture(scope="module")
def models():
    """The bf16 model on the GPU, built as from_pretrained(dtype=torch.bfloat16) builds it (rotary tables in fp32),
    and an fp32 "eager" copy of the same weights."""
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**LLAMA_1B),
                                                              dtype=torch.bfloat16).eval()
    truth = copy.deepcopy(model).float()
    truth.set_attn_implementation("eager")
    return model, truth


def batch(lengths: list[int], seqlen: int, left: bool, seed: int = 1):
    """(ids, attention_mask, position_ids) on the GPU: position_ids count real tokens, as generate() makes them."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, LLAMA_1B["vocab_size"], (len(lengths), seqlen), generator=g)
    mask = padding_mask(lengths, seqlen, left)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids.cuda(), mask.cuda(), positions.cuda()


def max_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return (ours.float() - ref.float()).abs().max().item()


def assert_within_twice_sdpa(ours: torch.Tensor, sdpa: torch.Tensor, truth: torch.Tensor, what: str) -> float:
    """FlashCore's error against the fp32 truth <= 2 x SDPA's + SLACK x max |truth|; returns the bound."""
    err, err_sdpa = max_error(ours, truth), max_error(sdpa, truth)
    bound = 2 * err_sdpa + SLACK * truth.abs().max().item()
    assert err <= bound, f"{what}: error {err:.3g} against fp32 > 2 x SDPA's {err_sdpa:.3g} + slack"
    return bound


@pytest.mark.parametrize("left", [True, False], ids=["left", "right"])
def test_logits_on_a_padded_batch(models, left):
    model, truth = models
    ids, mask, positions = batch([512, 400, 173, 31], 512, left)
    real = mask.bool()

    def logits(m):
        return m(ids, attention_mask=mask, position_ids=positions).logits[real]

    with torch.no_grad():
        ref = logits(truth)
        sdpa = run(model, "sdpa", lambda: logits(model))
        ours = run(model, ATTN_IMPLEMENTATION, lambda: logits(model))
        bound = assert_within_twice_sdpa(ours, sdpa, ref, "logits")
        if left:
            # the bound tells an ignored mask from an applied one (with left padding, real tokens would see the
            # pads), with room to spare
            unmasked = truth(ids, position_ids=positions).logits[real]
            assert max_error(unmasked, ref) > 3 * bound


@pytest.mark.parametrize("padded", [True, False], ids=["left-padded", "full"])
def test_greedy_generate_follows_sdpa(models, padded):
    """With left padding every step is varlen; without, the decode steps are flash_attn_with_kvcache. A random
    model's logits have near ties that bf16 noise may flip, and a flipped token changes the rest of its row: each
    row is compared up to its first differing token, that step included (both sides had the same tokens before
    it), and there the logits must agree within the bf16 tolerance, so a flip is a tie within it. The tolerance:
    3 x SDPA's error against the fp32 truth over all its steps (2 x for FlashCore's own error, once more for
    SDPA's) plus the slack."""
    model, truth = models
    prompt, new = 256, 32
    ids, mask, positions = batch([256, 190, 77, 12] if padded else [256] * 4, prompt, left=True)

    def generate():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                             return_dict_in_generate=True, output_logits=True)
        return out.sequences[:, prompt:], torch.stack(out.logits, 1).float()      # (B, new), (B, new, V)

    sdpa_tokens, sdpa_logits = run(model, "sdpa", generate)
    our_tokens, our_logits = run(model, ATTN_IMPLEMENTATION, generate)
    assert our_tokens.shape == sdpa_tokens.shape == (4, new)
    # the fp32 truth of SDPA's steps: its whole sequences at once, each step's logits from the token before it
    full_mask = torch.cat([mask, torch.ones_like(sdpa_tokens)], 1)
    with torch.no_grad():
        ref = truth(torch.cat([ids, sdpa_tokens], 1), attention_mask=full_mask,
                    position_ids=(full_mask.cumsum(-1) - 1).clamp(min=0)).logits[:, prompt - 1:-1]
    tolerance = 3 * max_error(sdpa_logits, ref) + SLACK * ref.abs().max().item()
    same = 0
    for row in range(4):
        differ = (our_tokens[row] != sdpa_tokens[row]).nonzero()
        first = int(differ[0]) if len(differ) else new
        same += first
        err = max_error(our_logits[row, :first + 1], sdpa_logits[row, :first + 1])
        assert err <= tolerance, f"row {row}: logits {err:.3g} from SDPA's by step {first} > {tolerance:.3g}"
    print(f"\ngenerate ({'left-padded' if padded else 'full'}): {same} / {4 * new} tokens as SDPA's before a "
          f"row's first difference")


def test_continuous_batching_picks_near_argmax_tokens(models):
    """generate_batch (transformers' continuous batching over its paged cache: FlashCore's varlen path with a block
    table for mixed prefill, flash_attn_with_kvcache for decode) on requests of mixed lengths. Every generated token
    must be a greedy choice up to bf16 noise: its fp32 logit (the truth run over the request's whole sequence)
    within the tolerance of that step's largest, the tolerance 4 x SDPA's bf16 logit error on the same sequences
    plus the slack. A wrong mask, block table or cache slot picks tokens far from the argmax."""
    model, truth = models
    if not hasattr(model, "generate_batch"):
        pytest.skip(f"transformers {transformers.__version__} has no continuous batching")
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(1, LLAMA_1B["vocab_size"], (n,), generator=g).tolist() for n in (300, 77, 1, 129, 16)]
    new = 16
    config = transformers.GenerationConfig(max_new_tokens=new, do_sample=False, eos_token_id=-1, pad_token_id=0)
    out = run(model, ATTN_IMPLEMENTATION, lambda: model.generate_batch(inputs=prompts, generation_config=config))
    for i, prompt in enumerate(prompts):
        generated = out[f"req_{i}"].generated_tokens
        assert len(generated) == new, f"request {i}: {len(generated)} tokens"
        seq = torch.tensor([prompt + generated], device="cuda")
        with torch.no_grad():
            ref = truth(seq).logits[0, len(prompt) - 1:-1]                   # (new, V): each step's fp32 logits
            sdpa = run(model, "sdpa", lambda: model(seq).logits[0, len(prompt) - 1:-1])
        tolerance = 4 * max_error(sdpa, ref) + SLACK * ref.abs().max().item()
        chosen = ref.gather(1, torch.tensor(generated, device="cuda")[:, None])[:, 0]
        gap = (ref.max(1).values - chosen).max().item()
        assert gap <= tolerance, f"request {i}: a token {gap:.3g} below the fp32 argmax > {tolerance:.3g}"


def test_training_step_gradients_follow_sdpa(models):
    """loss.backward() on a left-padded batch (the varlen backward): the loss and every parameter's gradient."""
    model, truth = models
    ids, mask, positions = batch([256, 150], 256, left=True)
    labels = ids.masked_fill(mask == 0, -100)
    # each row's first real token is predicted from a pad row: not a label
    labels[torch.arange(2), mask.argmax(1)] = -100

    def step(m):
        m.zero_grad(set_to_none=True)
        loss = m(ids, attention_mask=mask, position_ids=positions, labels=labels).loss
        loss.backward()
        return loss.detach()

    model.train()
    try:
        ref_loss = step(truth)
        sdpa_loss = run(model, "sdpa", lambda: step(model))
        sdpa_grads = {name: p.grad for name, p in model.named_parameters()}
        our_loss = run(model, ATTN_IMPLEMENTATION, lambda: step(model))
        assert_within_twice_sdpa(our_loss, sdpa_loss, ref_loss, "loss")
        ref_params = dict(truth.named_parameters())
        for name, p in model.named_parameters():
            assert_within_twice_sdpa(p.grad, sdpa_grads[name], ref_params[name].grad, f"d{name}")
    finally:
        model.eval()
        model.zero_grad(set_to_none=True)
        truth.zero_grad(set_to_none=True)


def test_time_per_generated_token(models):
    """Greedy generate() of 128 tokens after a 512-token prompt at batch 1 and 8 (no padding: the decode steps run
    flash_attn_with_kvcache), after a warm-up of the same call (kernel compiles, tuned-config picks). Printed as a
    table, and written to $FLASHCORE_OUT/hf-generate.json when FLASHCORE_OUT is set; only the token counts are
    checked. ms per token: the whole call over its new tokens; ms per decode step: the call less a 1-token call
    (the prefill), over the other 127."""
    model, _ = models
    prompt, new = 512, 128
    implementations = [ATTN_IMPLEMENTATION, "sdpa"]
    if transformers.utils.is_flash_attn_2_available():
        implementations.append("flash_attention_2")
    rows = []
    for batch_size in (1, 8):
        ids = torch.randint(1, LLAMA_1B["vocab_size"], (batch_size, prompt), device="cuda")
        for implementation in implementations:
            model.set_attn_implementation(implementation)

            def timed(tokens: int) -> float:
                torch.cuda.synchronize()
                start = time.perf_counter()
                out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens,
                                     min_new_tokens=tokens, do_sample=False)
                torch.cuda.synchronize()
                assert out.shape == (batch_size, prompt + tokens)
                return time.perf_counter() - start

            timed(new)
            prefill_s, total_s = timed(1), timed(new)
            rows.append({"attention": implementation, "batch": batch_size, "prompt": prompt, "new_tokens": new,
                         "generate_s": total_s, "ms_per_token": 1e3 * total_s / new,
                         "ms_per_decode_step": 1e3 * (total_s - prefill_s) / (new - 1)})
    print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}, transformers {transformers.__version__}: "
          f"1B-class Llama, bf16, {new} new tokens after {prompt}")
    print("| batch | attention | ms per token | ms per decode step |\n|---:|---|---:|---:|")
    for r in rows:
        print(f"| {r['batch']} | {r['attention']} | {r['ms_per_token']:.2f} | {r['ms_per_decode_step']:.2f} |")
    if out := os.environ.get("FLASHCORE_OUT"):
        with open(os.path.join(out, "hf-generate.json"), "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "transformers": transformers.__version__, "model": LLAMA_1B, "runs": rows}, f, indent=1)
