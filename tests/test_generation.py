"""End to end: greedy generation of a small random-initialised decoder (GQA, RoPE, RMSNorm, gated MLP) through
PagedKVCache + flash_attn_with_kvcache gives the same tokens as the same model recomputing full causal attention
with no cache, while sequences of different lengths join, fork and leave the batch.

The cached run is float32 through the kernels; the reference is float64 plain torch. Greedy tokens can only be
compared exactly where the reference's best logit leads the second by more than the cached run's error, so every
step checks that margin first (a property of the seeded model alone), then the logits, then the token.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

import flashcore
from flashcore import PagedKVCache
from flashcore.reference import attention_ref

VOCAB, HIDDEN, HEADS_Q, HEADS_KV, HEAD_DIM, LAYERS, MLP = 97, 64, 4, 2, 16, 2, 128
ROPE_BASE = 10000.0
LOGIT_SCALE = 4.0           # std of the logits: spreads them so greedy choices have a margin
LOGIT_ATOL = 1e-4           # float32 cached run vs float64 reference (observed: about 1e-5)
MIN_MARGIN = 10 * LOGIT_ATOL
BLOCK_SIZE, MAX_SEQLEN = 4, 32
WEIGHT_SEED = 4             # its reference generations' closest call is 0.12 (>> MIN_MARGIN), tokens varied


def make_weights(seed: int = WEIGHT_SEED) -> dict[str, torch.Tensor]:
    """float64 weights: embedding (V, H), per layer norms (H,), wq (H, Hq*D), wk / wv (H, Hkv*D), wo (Hq*D, H),
    gate / up (H, M), down (M, H); final norm and lm_head (H, V)."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, std):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * std

    w = {"embed": randn(VOCAB, HIDDEN, std=1.0), "norm_f": 1 + randn(HIDDEN, std=0.1),
         "lm_head": randn(HIDDEN, VOCAB, std=LOGIT_SCALE / math.sqrt(HIDDEN))}
    for layer in range(LAYERS):
        w |= {f"{layer}.norm1": 1 + randn(HIDDEN, std=0.1), f"{layer}.norm2": 1 + randn(HIDDEN, std=0.1),
              # x2 on q: scores of std about 2, so attention is peaked and which keys it sees matters
              f"{layer}.wq": randn(HIDDEN, HEADS_Q * HEAD_DIM, std=2 / math.sqrt(HIDDEN)),
              f"{layer}.wk": randn(HIDDEN, HEADS_KV * HEAD_DIM, std=1 / math.sqrt(HIDDEN)),
              f"{layer}.wv": randn(HIDDEN, HEADS_KV * HEAD_DIM, std=1 / math.sqrt(HIDDEN)),
              f"{layer}.wo": randn(HEADS_Q * HEAD_DIM, HIDDEN, std=1 / math.sqrt(HEADS_Q * HEAD_DIM)),
              f"{layer}.gate": randn(HIDDEN, MLP, std=1 / math.sqrt(HIDDEN)),
              f"{layer}.up": randn(HIDDEN, MLP, std=1 / math.sqrt(HIDDEN)),
              f"{layer}.down": randn(MLP, HIDDEN, std=1 / math.sqrt(MLP))}
    return w


def rope_tables(length: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (length, HEAD_DIM / 2): the API's rotary_cos / rotary_sin, GPT-NeoX frequencies."""
    inv_freq = ROPE_BASE ** (-torch.arange(0, HEAD_DIM, 2, dtype=torch.float64) / HEAD_DIM)
    angles = torch.arange(length, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rope(x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (S, H, D) rotated GPT-NeoX style (pairs x[i], x[i + D/2]) at `positions` (S,)."""
    c, s = cos[positions][:, None, :], sin[positions][:, None, :]
    x1, x2 = x[..., :HEAD_DIM // 2], x[..., HEAD_DIM // 2:]
    return torch.cat((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1)


def rms_norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * weight


def decoder(w: dict[str, torch.Tensor], tokens: torch.Tensor, attend) -> torch.Tensor:
    """Logits (B, S, V) of tokens (B, S); attend(layer, q (B, S, Hq, D), k, v (B, S, Hkv, D)) -> (B, S, Hq, D)
    is the attention, rotary included: the only part the cached and the reference runs do differently."""
    batch, seqlen = tokens.shape
    x = w["embed"][tokens]
    for layer in range(LAYERS):
        h = rms_norm(x, w[f"{layer}.norm1"])
        q = (h @ w[f"{layer}.wq"]).view(batch, seqlen, HEADS_Q, HEAD_DIM)
        k = (h @ w[f"{layer}.wk"]).view(batch, seqlen, HEADS_KV, HEAD_DIM)
        v = (h @ w[f"{layer}.wv"]).view(batch, seqlen, HEADS_KV, HEAD_DIM)
        x = x + attend(layer, q, k, v).reshape(batch, seqlen, -1) @ w[f"{layer}.wo"]
        h = rms_norm(x, w[f"{layer}.norm2"])
        x = x + (F.silu(h @ w[f"{layer}.gate"]) * (h @ w[f"{layer}.up"])) @ w[f"{layer}.down"]
    return rms_norm(x, w["norm_f"]) @ w["lm_head"]


def reference_greedy(w64: dict[str, torch.Tensor], prefix: list[int], steps: int):
    """(tokens, logits per token) of `steps` greedy tokens after `prefix`, recomputing the whole sequence's causal
    attention in float64 at every step, with no cache."""
    cos, sin = rope_tables(MAX_SEQLEN, torch.float64)

    def attend(layer, q, k, v):
        positions = torch.arange(q.shape[1])
        q, k = rope(q[0], positions, cos, sin)[None], rope(k[0], positions, cos, sin)[None]
        return attention_ref(q, k, v, causal=True)[0]

    tokens, logits = list(prefix), []
    for _ in range(steps):
        logits.append(decoder(w64, torch.tensor([tokens]), attend)[0, -1])
        tokens.append(int(logits[-1].argmax()))
    return tokens[len(prefix):], logits


@dataclass
class Request:
    prefix: list[int]             # what the reference starts from
    budget: int                   # greedy tokens to generate after the prefix
    tokens: list[int] = field(default_factory=list)    # prefix + generated; the last one is not in the cache yet
    logits: list[torch.Tensor] = field(default_factory=list)

    def __post_init__(self):
        self.tokens = list(self.prefix)

    @property
    def done(self) -> bool:
        return len(self.tokens) - len(self.prefix) == self.budget


class CachedModel:
    """The decoder in float32 over a PagedKVCache, attention through flashcore.flash_attn_with_kvcache."""

    def __init__(self, w64: dict[str, torch.Tensor], cache: PagedKVCache):
        self.w = {name: t.to(cache.dtype) for name, t in w64.items()}
        self.cache = cache
        self.cos, self.sin = rope_tables(cache.capacity, cache.dtype)

    def prefill_appending(self, seq_id, prompt: list[int]) -> torch.Tensor:
        """Prompt attention in one call per layer that appends the prompt's k/v (rotary by the API). (V,) logits."""
        cache, ids = self.cache, [seq_id]
        cache.reserve(ids, len(prompt))
        lens, table = cache.seqlens(ids), cache.block_table(ids)

        def attend(layer, q, k, v):
            return flashcore.flash_attn_with_kvcache(
                q, cache.k_pools[layer], cache.v_pools[layer], k=k, v=v, rotary_cos=self.cos, rotary_sin=self.sin,
                cache_seqlens=lens, block_table=table, causal=True, rotary_interleaved=False)

        logits = decoder(self.w, torch.tensor([prompt]), attend)
        cache.commit(ids, len(prompt))
        return logits[0, -1]

    def prefill_writing(self, seq_id, prompt: list[int]) -> torch.Tensor:
        """The model rotates q and k itself, `write`s k/v into the blocks, then attends over the cache without an
        append (cache_seqlens = the whole prompt). (V,) logits."""
        cache, ids, seqlen = self.cache, [seq_id], len(prompt)
        cache.reserve(ids, seqlen)
        lens, table = cache.seqlens(ids) + seqlen, cache.block_table(ids)
        positions = torch.arange(seqlen)

        def attend(layer, q, k, v):
            k = rope(k[0], positions, self.cos, self.sin)
            cache.write(layer, seq_id, k, v[0])
            q = rope(q[0], positions, self.cos, self.sin)[None]
            return flashcore.flash_attn_with_kvcache(q, cache.k_pools[layer], cache.v_pools[layer],
                                                     cache_seqlens=lens, block_table=table, causal=True)

        logits = decoder(self.w, torch.tensor([prompt]), attend)
        cache.commit(ids, seqlen)
        return logits[0, -1]

    def decode(self, seq_ids: list, last_tokens: list[int]) -> torch.Tensor:
        """One token per sequence (Sq = 1), its k/v appended and rotated by the API. (B, V) logits."""
        cache = self.cache
        cache.reserve(seq_ids, 1)
        lens, table = cache.seqlens(seq_ids), cache.block_table(seq_ids)

        def attend(layer, q, k, v):
            return flashcore.flash_attn_with_kvcache(
                q, cache.k_pools[layer], cache.v_pools[layer], k=k, v=v, rotary_cos=self.cos, rotary_sin=self.sin,
                cache_seqlens=lens, block_table=table, causal=True, rotary_interleaved=False)

        logits = decoder(self.w, torch.tensor(last_tokens)[:, None], attend)
        cache.commit(seq_ids, 1)
        return logits[:, 0]


def test_paged_greedy_generation_matches_full_recompute_as_sequences_join_fork_and_leave(cpu_only):
    """CPU (interpreter) only: on a GPU, float32 dots run in TF32, far outside LOGIT_ATOL."""
    w64 = make_weights()
    prompts = torch.randint(0, VOCAB, (4, 11), generator=torch.Generator().manual_seed(1)).tolist()
    # join step -> (seq_id, prompt, greedy tokens, prefill path); B leaves after step 1, D joins at step 2 and
    # must reuse B's blocks; at step 3 C (length not a multiple of the block size) forks into E.
    joins = {0: [("A", prompts[0][:5], 10, "append"), ("B", prompts[1][:11], 3, "append"),
                 ("C", prompts[2][:3], 9, "append")],
             2: [("D", prompts[3][:7], 6, "write")]}
    forks = {3: ("C", "E", 5)}
    cache = PagedKVCache(LAYERS, num_blocks=14, block_size=BLOCK_SIZE, num_kv_heads=HEADS_KV, head_dim=HEAD_DIM,
                         dtype=torch.float32, max_seqlen=MAX_SEQLEN)
    model = CachedModel(w64, cache)
    live: dict[str, Request] = {}
    finished: dict[str, Request] = {}
    freed_blocks: dict[str, tuple[int, ...]] = {}

    def take(seq: Request, logits: torch.Tensor) -> None:
        seq.logits.append(logits.double())
        seq.tokens.append(int(logits.argmax()))

    for step in range(12):
        for seq_id, prompt, budget, path in joins.get(step, []):
            cache.add_sequence(seq_id)
            live[seq_id] = Request(prompt, budget)
            prefill = model.prefill_appending if path == "append" else model.prefill_writing
            take(live[seq_id], prefill(seq_id, prompt))
        if step in forks:
            parent, child, budget = forks[step]
            assert cache.length(parent) % BLOCK_SIZE, "the fork should copy a partly filled block"
            cache.fork(parent, child)
            # The child differs from its parent by the pending token (not in the cache yet): the next best one.
            pending = int(live[parent].logits[-1].topk(2).indices[1])
            live[child] = Request(live[parent].tokens[:-1] + [pending], budget)
        batch = [s for s, seq in live.items() if not seq.done]
        if batch:
            for seq_id, logits in zip(batch, model.decode(batch, [live[s].tokens[-1] for s in batch])):
                take(live[seq_id], logits)
        for seq_id in [s for s, seq in live.items() if seq.done]:
            freed_blocks[seq_id] = cache.blocks(seq_id)
            cache.free(seq_id)
            finished[seq_id] = live.pop(seq_id)

    assert not live and sorted(finished) == list("ABCDE")
    assert freed_blocks["D"][:2] == freed_blocks["B"][:2], freed_blocks     # D reuses B's blocks
    assert any(list(b) != sorted(b) for b in freed_blocks.values()), freed_blocks   # tables out of order
    assert cache.num_free_blocks == cache.num_blocks
    for seq_id, seq in finished.items():
        ref_tokens, ref_logits = reference_greedy(w64, seq.prefix, seq.budget)
        generated = seq.tokens[len(seq.prefix):]
        for i, (logits, expected) in enumerate(zip(seq.logits, ref_logits)):
            top2 = expected.topk(2).values
            assert top2[0] - top2[1] > MIN_MARGIN, f"{seq_id} step {i}: the test model has a near tie; reseed it"
            err = (logits - expected).abs().max().item()
            assert err <= LOGIT_ATOL, f"{seq_id} step {i}: logits differ from the reference by {err:.3g}"
            assert generated[i] == ref_tokens[i], f"{seq_id} step {i}: token {generated[i]} != {ref_tokens[i]}"
