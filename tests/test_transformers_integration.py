"""flashcore.integrations.transformers: tiny randomly initialised transformers models (no downloads) run with
attn_implementation="flashcore" against the same weights under "eager" (the models' own attention, which
implements their softcap and sliding windows exactly), in float32: logits without and with padding, packed
sequences, greedy generate() (dynamic, sliding-window and static caches), and the gradients of a training step.

The weights are initialised 10x larger than transformers' default so that attention is far from uniform: causality,
windows, softcap and padding then change the logits well beyond the 1e-4 relative tolerance (float32 noise is
about 1e-6), so an attention function that gets one of them wrong fails these tests.
"""
from __future__ import annotations

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402
import transformers  # noqa: E402

from flashcore.integrations.transformers import ATTN_IMPLEMENTATION  # noqa: E402

REL = 1e-4
VOCAB = 97
SMALL = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
             intermediate_size=128, vocab_size=VOCAB, initializer_range=0.2, pad_token_id=0, eos_token_id=None)
# sequences of 16-20 tokens against windows of 8: the windows cut into every prompt
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3-mqa": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=16, num_key_value_heads=1)),
    "mistral-window": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=8)),
    "gemma2-softcap-window": ("Gemma2Config", "Gemma2ForCausalLM",
                              dict(head_dim=16, sliding_window=8, attn_logit_softcapping=2.0,
                                   query_pre_attn_scalar=32)),
    "gemma3-window": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(head_dim=16, sliding_window=8)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}),
}


def build(family: str):
    config_name, model_name, extra = FAMILIES[family]
    if not hasattr(transformers, model_name):
        pytest.skip(f"transformers {transformers.__version__} has no {model_name}")
    config = getattr(transformers, config_name)(**{**SMALL, **extra})
    torch.manual_seed(0)
    return getattr(transformers, model_name)(config).float().eval()


def tokens(batch: int, seqlen: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(1, VOCAB, (batch, seqlen), generator=torch.Generator().manual_seed(seed))


def padding_mask(lengths: list[int], seqlen: int, left: bool) -> torch.Tensor:
    positions = torch.arange(seqlen)
    lengths = torch.tensor(lengths)[:, None]
    return (positions >= seqlen - lengths if left else positions < lengths).long()


def assert_close(ours: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    err = (ours - ref).abs().max().item()
    scale = ref.abs().max().item()
    assert err <= REL * scale, f"{what}: max error {err:.3g} > {REL} x max |ref| {scale:.3g}"


def run(model, implementation: str, fn):
    model.set_attn_implementation(implementation)
    return fn()


def test_name_loads_through_from_pretrained_and_set_attn_implementation(tmp_path):
    assert ATTN_IMPLEMENTATION == "flashcore"
    build("llama").save_pretrained(tmp_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation=ATTN_IMPLEMENTATION)
    assert model.config._attn_implementation == ATTN_IMPLEMENTATION
    ids = tokens(1, 12)
    with torch.no_grad():
        ours = model(ids).logits
        ref = run(model, "eager", lambda: model(ids).logits)
        again = run(model, ATTN_IMPLEMENTATION, lambda: model(ids).logits)
    assert model.config._attn_implementation == ATTN_IMPLEMENTATION
    assert_close(ours, ref, "from_pretrained")
    assert torch.equal(ours, again)


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_without_padding(family):
    model = build(family)
    ids = tokens(2, 18)
    with torch.no_grad():
        ref = run(model, "eager", lambda: model(ids).logits)
        ours = run(model, ATTN_IMPLEMENTATION, lambda: model(ids).logits)
    assert_close(ours, ref, family)


@pytest.mark.parametrize("left", [True, False], ids=["left", "right"])
@pytest.mark.parametrize("family", FAMILIES)
def test_logits_with_padding(family, left):
    """The varlen path; only the real tokens are compared (padded rows are 0 here, anything in eager). With right
    padding causal attention never reaches the pads: that case checks the gather / scatter around the kernel."""
    model = build(family)
    ids, mask = tokens(3, 18), padding_mask([18, 11, 5], 18, left)
    with torch.no_grad():
        ref = run(model, "eager", lambda: model(ids, attention_mask=mask).logits)
        ours = run(model, ATTN_IMPLEMENTATION, lambda: model(ids, attention_mask=mask).logits)
    real = mask.bool()
    assert_close(ours[real], ref[real], family)


def test_packed_sequences():
    """One row holding three sequences, marked by position_ids that restart, or by the collators' cu_seq_lens
    kwargs alone (positions then run on across the row: rotary embeddings only see distances within a sequence),
    against each sequence on its own."""
    model = build("mistral-window")
    lengths = [7, 12, 3]
    ids = tokens(1, sum(lengths))
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    cu = torch.tensor([0, 7, 19, 22], dtype=torch.int32)
    with torch.no_grad():
        ref = run(model, "eager", lambda: torch.cat([model(part).logits for part in ids.split(lengths, 1)], 1))
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
        by_positions = model(ids, position_ids=position_ids, use_cache=False).logits
        by_offsets = model(ids, use_cache=False, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=12,
                           max_length_k=12).logits
    assert_close(by_positions, ref, "position_ids")
    assert_close(by_offsets, ref, "cu_seq_lens")


GENERATE_CASES = [("llama", "dynamic"), ("llama", "static"), ("qwen3-mqa", "dynamic"),
                  ("mistral-window", "dynamic"), ("gemma2-softcap-window", "dynamic"), ("phi3", "dynamic")]


@pytest.mark.parametrize("padded", [False, True], ids=["full", "left-padded"])
@pytest.mark.parametrize("family,cache", GENERATE_CASES, ids=[f"{f}-{c}" for f, c in GENERATE_CASES])
def test_greedy_generate(family, cache, padded):
    """Without padding the decode steps run flash_attn_with_kvcache; with left padding, varlen. A static cache
    holds more rows than tokens: its padding mask (kept because the name contains "flash") says which are real.
    The prompts (16) plus new tokens (6) outgrow the windows (8)."""
    model = build(family)
    ids = tokens(2, 16)
    mask = padding_mask([16, 9] if padded else [16, 16], 16, left=True)

    def generate():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, cache_implementation=cache,
                             return_dict_in_generate=True, output_logits=True)
        return out.sequences, torch.stack(out.logits)

    ref_tokens, ref_logits = run(model, "eager", generate)
    our_tokens, our_logits = run(model, ATTN_IMPLEMENTATION, generate)
    assert torch.equal(our_tokens, ref_tokens)
    assert_close(our_logits, ref_logits, f"{family} generate")


@pytest.mark.parametrize("padded", [False, True], ids=["full", "left-padded"])
@pytest.mark.parametrize("family", ["llama", "gemma2-softcap-window", "qwen3-mqa"])
def test_training_step_gradients(family, padded):
    """loss.backward() through flash_attn_func (no padding) or flash_attn_varlen_func (padding): every
    parameter's gradient against eager's."""
    model = build(family).train()
    ids = tokens(2, 16)
    mask = padding_mask([16, 10] if padded else [16, 16], 16, left=True)
    labels = ids.masked_fill(mask == 0, -100)
    # each row's first real token is predicted from a pad row (its output: 0 here, anything in eager): not a label
    labels[torch.arange(2), mask.argmax(1)] = -100

    def gradients():
        model.zero_grad()
        model(ids, attention_mask=mask, labels=labels).loss.backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    ref = run(model, "eager", gradients)
    ours = run(model, ATTN_IMPLEMENTATION, gradients)
    assert ours.keys() == ref.keys()
    for name in ref:
        assert_close(ours[name], ref[name], f"{family} d{name}")


def test_unsupported_dtype_is_refused():
    model = build("llama").double()
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    with pytest.raises(TypeError, match="load the model with dtype="), torch.no_grad():
        model(tokens(1, 8))


@pytest.mark.parametrize("family", ["llama", "qwen3-mqa"])
def test_continuous_batching_serves_each_request_the_eager_tokens(family):
    """generate_batch: transformers' continuous batching over its paged cache (requests of different lengths in one
    batch; the cache gathers each sequence's keys and FlashCore attends them through the varlen path)."""
    model = build(family)
    if not hasattr(model, "generate_batch"):
        pytest.skip(f"transformers {transformers.__version__} has no continuous batching")
    prompts = [tokens(1, n, seed=n)[0].tolist() for n in (5, 12, 3)]
    config = transformers.GenerationConfig(max_new_tokens=5, do_sample=False, eos_token_id=-1, pad_token_id=0)
    expected = run(model, "eager", lambda: [model.generate(torch.tensor([p]), generation_config=config)[0, len(p):]
                                            .tolist() for p in prompts])
    batched = run(model, ATTN_IMPLEMENTATION, lambda: model.generate_batch(inputs=prompts, generation_config=config))
    assert [batched[f"req_{i}"].generated_tokens for i in range(len(prompts))] == expected


def test_the_block_table_decode_path_appends_into_the_paged_cache_and_attends_through_it():
    """The decode fast path's arguments as continuous batching hands them (one new token per sequence, packed; the
    layer's paged cache; a block table; cu_seq_lens_k counting the new token), against a dense reference."""
    from flashcore.integrations.transformers import flashcore_attention_forward
    from flashcore.reference import attention_ref
    heads_q, heads_kv, dim, page = 4, 2, 16, 4
    lengths = [5, 1, 9]                                   # keys per sequence, the new token included
    pool_k, pool_v = (torch.randn(12, page, heads_kv, dim) for _ in range(2))
    table = torch.tensor([[7, 2, 0], [5, 0, 0], [1, 11, 3]], dtype=torch.int32)
    q, k, v = torch.randn(1, heads_q, 3, dim), torch.randn(1, heads_kv, 3, dim), torch.randn(1, heads_kv, 3, dim)
    cu_k = torch.tensor([0, 5, 6, 15], dtype=torch.int32)
    before_k, before_v = pool_k.clone(), pool_v.clone()
    module = torch.nn.Module()
    module.is_causal = True
    out, weights = flashcore_attention_forward(module, q, k, v, None, scaling=dim ** -0.5, block_table=table,
                                               k_cache=pool_k, v_cache=pool_v, cu_seq_lens_k=cu_k, max_length_k=9)
    assert weights is None and out.shape == (1, 3, heads_q, dim)
    for b, n in enumerate(lengths):
        slot = (int(table[b, (n - 1) // page]), (n - 1) % page)                  # where the new token lands
        torch.testing.assert_close(pool_k[slot], k[0, :, b]), torch.testing.assert_close(pool_v[slot], v[0, :, b])
        keys = torch.cat([pool_k[int(i)] for i in table[b, :-(-n // page)]])[:n]
        values = torch.cat([pool_v[int(i)] for i in table[b, :-(-n // page)]])[:n]
        want = attention_ref(q[:, :, b:b + 1].transpose(1, 2), keys[None], values[None], causal=True)[0]
        torch.testing.assert_close(out[:, b:b + 1].double(), want, atol=1e-5, rtol=0)
    touched = (pool_k != before_k).any(dim=(1, 2, 3)) | (pool_v != before_v).any(dim=(1, 2, 3))
    assert set(touched.nonzero().flatten().tolist()) <= {int(table[b, (n - 1) // page]) for b, n in enumerate(lengths)}


def test_padded_decode_rows_of_older_continuous_batching_touch_only_the_trash_block():
    """transformers < 5.23 pads a CUDA-graphed decode batch with rows of cache_seqlens -1 and block-table rows of -1,
    and calls flash_attn_with_kvcache through the loader: the real rows attend and append as in a batch without the
    padding, and the padded row writes nowhere but the cache's last block (transformers' write trash)."""
    from flashcore import flash_attn_with_kvcache
    from flashcore.integrations.transformers import _with_kvcache_of_padded_batches
    heads_q, heads_kv, dim, page, blocks = 4, 2, 16, 4, 10              # block 9: the trash
    pool_k, pool_v = (torch.randn(blocks, page, heads_kv, dim) for _ in range(2))
    table = torch.tensor([[3, 6, -1], [-1, -1, -1], [0, -1, -1]], dtype=torch.int32)
    seqlens = torch.tensor([5, -1, 2], dtype=torch.int32)
    q, k, v = torch.randn(3, 1, heads_q, dim), torch.randn(3, 1, heads_kv, dim), torch.randn(3, 1, heads_kv, dim)
    real_k, real_v = pool_k.clone(), pool_v.clone()
    want = flash_attn_with_kvcache(q[[0, 2]], real_k, real_v, k[[0, 2]], v[[0, 2]], cache_seqlens=seqlens[[0, 2]],
                                   block_table=table[[0, 2]], causal=True)
    before_k = pool_k.clone()
    out = _with_kvcache_of_padded_batches(q, pool_k, pool_v, k, v, cache_seqlens=seqlens, block_table=table,
                                          causal=True)
    torch.testing.assert_close(out[[0, 2]], want, atol=0, rtol=0)
    assert torch.isfinite(out[1]).all()
    torch.testing.assert_close(pool_k[:-1], real_k[:-1], atol=0, rtol=0)
    torch.testing.assert_close(pool_v[:-1], real_v[:-1], atol=0, rtol=0)
    assert not torch.equal(pool_k[:-1], before_k[:-1])          # the real rows appended


def test_padded_varlen_batches_of_older_continuous_batching_attend_as_unpadded():
    """transformers < 5.23 pads a CUDA-graphed varlen batch: q and the gathered keys run past the last sequence's
    rows (cu_seqlens end short of them). Through the loader, every sequence's rows equal those of the same call
    without the padding rows, and the padding rows are finite."""
    from flashcore import flash_attn_varlen_func
    from flashcore.integrations.transformers import _varlen_of_padded_batches
    heads_q, heads_kv, dim = 4, 2, 16
    cu_q = torch.tensor([0, 5, 17, 20], dtype=torch.int32)
    cu_k = torch.tensor([0, 9, 21, 30], dtype=torch.int32)
    q = torch.randn(32, heads_q, dim)                                      # 12 padding rows
    k, v = torch.randn(40, heads_kv, dim), torch.randn(40, heads_kv, dim)  # 10 padding keys
    want = flash_attn_varlen_func(q[:20], k[:30], v[:30], cu_q, cu_k, 12, 12, causal=True)
    out = _varlen_of_padded_batches(q, k, v, cu_q, cu_k, 12, 12, causal=True)
    assert out.shape == q.shape
    torch.testing.assert_close(out[:20], want, atol=0, rtol=0)
    assert torch.isfinite(out[20:]).all()
