"""End to end: greedy generation of a small random-initialised decoder (GQA, RoPE, RMSNorm, gated MLP) through
PagedKVCache gives the same tokens as the same model recomputing full causal attention with no cache:
  - decode through flash_attn_with_kvcache, while sequences of different lengths join, fork and leave the batch;
  - a server loop (vLLM style): a stream of requests, prompts prefilled in chunks and mixed with decoding
    sequences in one flash_attn_varlen_func(..., block_table=...) call per layer per step, prefixes shared by fork.

The cached runs are float32 through the kernels; the reference is float64 plain torch. Greedy tokens can only be
compared exactly where the reference's best logit leads the second by more than the cached run's error, so every
step checks that margin first (a property of the seeded model alone), then the logits, then the token.
"""
from __future__ import annotations

import itertools
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
    cos, sin = rope_tables(len(prefix) + steps, torch.float64)

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


class ServingModel:
    """The decoder in float32 over a PagedKVCache, served the way vLLM does: a step packs the new tokens of every
    scheduled sequence (a prompt chunk, or the one token it decodes) along the token dimension and runs one
    flash_attn_varlen_func per layer over the paged cache. The model rotates q and k at the tokens' positions and
    stores k/v with write_packed before the call, so each chunk attends to its cached prefix and to itself."""

    def __init__(self, w64: dict[str, torch.Tensor], cache: PagedKVCache, max_chunk: int):
        self.w = {name: t.to(cache.dtype) for name, t in w64.items()}
        self.cache, self.max_chunk = cache, max_chunk
        self.cos, self.sin = rope_tables(cache.capacity, cache.dtype)

    def step(self, seq_ids: list, new_tokens: list[list[int]]) -> torch.Tensor:
        """Feed new_tokens[b] (1 .. max_chunk tokens) to seq_ids[b]. (B, V) logits of each one's last new token."""
        cache, num_new = self.cache, [len(t) for t in new_tokens]
        cache.reserve(seq_ids, num_new)
        cu_seqlens_q, cu_seqlens_k = cache.cu_seqlens(seq_ids, num_new)
        table, positions = cache.block_table(seq_ids), cache.positions(seq_ids, num_new)

        def attend(layer, q, k, v):             # (1, total_new, H, D): the whole step packed as one row
            q, k = rope(q[0], positions, self.cos, self.sin), rope(k[0], positions, self.cos, self.sin)
            cache.write_packed(layer, seq_ids, k, v[0], num_new)
            out = flashcore.flash_attn_varlen_func(q, cache.k_pools[layer], cache.v_pools[layer], cu_seqlens_q,
                                                   cu_seqlens_k, self.max_chunk, cache.capacity, causal=True,
                                                   block_table=table)
            return out[None]

        logits = decoder(self.w, torch.tensor([list(itertools.chain(*new_tokens))]), attend)[0]
        cache.commit(seq_ids, num_new)
        return logits[[end - 1 for end in itertools.accumulate(num_new)]]


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
    assert_matches_reference(w64, finished)


def assert_matches_reference(w64: dict[str, torch.Tensor], finished: dict[str, Request]) -> None:
    """Every finished request's greedy tokens and logits against reference_greedy, step by step: the reference's
    margin first (a near tie is the seeded model's fault, not the cache's), then the logits, then the token."""
    for seq_id, seq in finished.items():
        ref_tokens, ref_logits = reference_greedy(w64, seq.prefix, seq.budget)
        generated = seq.tokens[len(seq.prefix):]
        for i, (logits, expected) in enumerate(zip(seq.logits, ref_logits)):
            top2 = expected.topk(2).values
            assert top2[0] - top2[1] > MIN_MARGIN, f"{seq_id} step {i}: the test model has a near tie; reseed it"
            err = (logits - expected).abs().max().item()
            assert err <= LOGIT_ATOL, f"{seq_id} step {i}: logits differ from the reference by {err:.3g}"
            assert generated[i] == ref_tokens[i], f"{seq_id} step {i}: token {generated[i]} != {ref_tokens[i]}"


CHUNK = 8                   # prompt tokens a sequence prefills per step at most (the varlen call's max_seqlen_q)
TOKEN_BUDGET = 18           # tokens one step packs at most: decodes first, then prompt chunks
SERVE_BLOCK_SIZE = 5        # chunk ends fall inside blocks; forks meet both full and partly filled last blocks


def schedule(live: dict[str, Request], cache: PagedKVCache) -> list[tuple[str, list[int]]]:
    """A step's (seq_id, new tokens), in arrival order: one token for each decoding sequence (one token not in the
    cache), then prompt chunks of at most CHUNK tokens, oldest request first, while the step's TOKEN_BUDGET lasts."""
    pending = {s: seq.tokens[cache.length(s):] for s, seq in live.items() if not seq.done}
    counts = {s: 1 for s, tokens in pending.items() if len(tokens) == 1}
    budget = TOKEN_BUDGET - len(counts)
    for s, tokens in pending.items():
        if s not in counts and budget > 0:
            counts[s] = min(len(tokens), CHUNK, budget)
            budget -= counts[s]
    return [(s, tokens[:counts[s]]) for s, tokens in pending.items() if counts.get(s)]


def test_served_request_stream_with_chunked_prefill_and_forked_prefixes_matches_full_recompute(cpu_only):
    """Requests arrive and finish at different steps; prompts of 1 to 60 tokens are prefilled in chunks, packed
    with other sequences' chunks and with decoding sequences in one varlen call per layer per step; two requests
    fork another's prefilled prefix (at a block boundary and inside a block), one forks a decoding sequence.
    CPU (interpreter) only, like the test above."""
    w64 = make_weights()
    g = torch.Generator().manual_seed(2)
    # step -> arriving requests: (seq_id, prompt length, greedy tokens to generate)
    arrivals = {0: [("A", 60, 2), ("B", 1, 4), ("C", 13, 3)], 2: [("D", 29, 2)], 8: [("H", 6, 2)]}
    # step -> prefix sharing: (parent, child, suffix length, greedy tokens); the child's prompt is what the parent
    # has in the cache (shared by fork, not recomputed), then its own suffix
    prefix_forks = {3: ("D", "F", 3, 2), 5: ("A", "E", 5, 2)}
    # step -> (parent, child, greedy tokens): the child of a decoding sequence continues with its second-best token
    decode_forks = {3: ("C", "G", 2)}
    cache = PagedKVCache(LAYERS, num_blocks=40, block_size=SERVE_BLOCK_SIZE, num_kv_heads=HEADS_KV,
                         head_dim=HEAD_DIM, dtype=torch.float32, max_seqlen=72)    # (A: 60 + 2 tokens)
    model = ServingModel(w64, cache, max_chunk=CHUNK)
    live: dict[str, Request] = {}
    finished: dict[str, Request] = {}
    freed_blocks: dict[str, tuple[int, ...]] = {}
    fork_lengths, batches = [], []

    for step in range(20):
        for seq_id, length, budget in arrivals.get(step, []):
            cache.add_sequence(seq_id)
            live[seq_id] = Request(torch.randint(0, VOCAB, (length,), generator=g).tolist(), budget)
        if step in prefix_forks:
            parent, child, suffix, budget = prefix_forks[step]
            assert len(live[parent].tokens) - cache.length(parent) > 1, "the parent should be prefilling"
            fork_lengths.append(cache.length(parent))
            cache.fork(parent, child)
            suffix_tokens = torch.randint(0, VOCAB, (suffix,), generator=g).tolist()
            live[child] = Request(live[parent].tokens[:cache.length(parent)] + suffix_tokens, budget)
        if step in decode_forks:
            parent, child, budget = decode_forks[step]
            assert len(live[parent].tokens) - cache.length(parent) == 1, "the parent should be decoding"
            fork_lengths.append(cache.length(parent))
            cache.fork(parent, child)
            pending = int(live[parent].logits[-1].topk(2).indices[1])
            live[child] = Request(live[parent].tokens[:-1] + [pending], budget)
        batch = schedule(live, cache)
        if not batch:
            assert not live and step > max(arrivals)
            break
        # (seq_id, cached, new, pending) per scheduled sequence, and how many waiting ones got no token
        batches.append(([(s, cache.length(s), len(t), len(live[s].tokens) - cache.length(s)) for s, t in batch],
                        sum(not seq.done for seq in live.values()) - len(batch)))
        logits = model.step([s for s, _ in batch], [tokens for _, tokens in batch])
        for (seq_id, _), row in zip(batch, logits):
            seq = live[seq_id]
            if cache.length(seq_id) == len(seq.tokens):     # its known tokens are all in: the next one is greedy
                seq.logits.append(row.double())
                seq.tokens.append(int(row.argmax()))
        for seq_id in [s for s, seq in live.items() if seq.done]:
            freed_blocks[seq_id] = cache.blocks(seq_id)
            cache.free(seq_id)
            finished[seq_id] = live.pop(seq_id)

    assert not live and sorted(finished) == list("ABCDEFGH")
    assert cache.num_free_blocks == cache.num_blocks
    # what the stream was meant to exercise
    assert {len(finished[s].prefix) for s in "AB"} == {60, 1}
    assert set(freed_blocks["H"]) <= set().union(*(freed_blocks[s] for s in "BCDEFG")), freed_blocks   # reused
    assert any(n % SERVE_BLOCK_SIZE == 0 for n in fork_lengths) and any(n % SERVE_BLOCK_SIZE for n in fork_lengths)
    # a step with a decode, a chunk after a cached prefix and a first chunk; a chunk cut by the token budget; a
    # step that leaves a waiting sequence out
    assert any(any(n == 1 for _, _, n, _ in b) and any(cached and n > 1 for _, cached, n, _ in b)
               and any(not cached and n > 1 for _, cached, n, _ in b) for b, _ in batches), batches
    assert any(n < min(CHUNK, pending) for b, _ in batches for _, _, n, pending in b), batches
    assert any(left_out for _, left_out in batches), batches
    assert_matches_reference(w64, finished)
