"""A serving loop on FlashCore's API: continuous batching over a PagedKVCache, chunked prefill and decode in one
step, requests arriving and finishing, decode-only steps replayed from CUDA graphs. A demonstration of what a
serving engine asks of the attention library, not an engine: no sampling beyond greedy, no preemption, a random
model.

    python examples/serve.py                            # a tiny model: GPU, or CPU with TRITON_INTERPRET=1 (fp32)
    python examples/serve.py --model small --requests 64 --rate 50     # GPU: a ~0.5B-shaped model in bf16

Each step the scheduler packs, in arrival order, one token for every sequence that is decoding, then prompt chunks
of at most --chunk tokens, while --token-budget lasts. The model runs the step as vLLM does:
    cache.reserve(ids, num_new)                               # blocks for the new tokens
    cu_q, cu_k = cache.cu_seqlens(ids, num_new)               # new tokens; cached prefix + new tokens
    per layer: q, k, v of the packed new tokens, rotary at cache.positions(ids, num_new),
               cache.write_packed(layer, ids, k, v, num_new),
               flash_attn_varlen_func(q, k_pool, v_pool, cu_q, cu_k, chunk, capacity, causal=True,
                                      block_table=cache.block_table(ids))
    cache.commit(ids, num_new)
A step in which every scheduled sequence decodes (the common case once prompts are in) instead runs
flash_attn_with_kvcache (q of one token per sequence, the new k / v appended by the kernel at cache_seqlens) inside
a CUDA graph captured once per padded batch size (1, 2, 4, ...): the batch's token ids, cache_seqlens and block
table are copied into the graph's static inputs and the graph replayed. Rows past the real batch point at a
one-block scratch sequence with cache_seqlens 0, so their appends land there and nothing real is touched.

Printed at the end: requests, output tokens, wall time, output tokens/s, and the mean time per output token
(a request's time from its first output token to its last, over its output tokens after the first).
"""
from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

import flashcore
from flashcore import PagedKVCache


@dataclass(frozen=True)
class Shape:
    vocab: int
    hidden: int
    heads_q: int
    heads_kv: int
    head_dim: int
    layers: int
    mlp: int


SHAPES = {"tiny": Shape(97, 64, 4, 2, 16, 2, 128), "small": Shape(32000, 1024, 16, 4, 64, 16, 2816)}
ROPE_BASE = 10000.0
SCRATCH = "<scratch>"      # the sequence padded decode rows write into


# ---------------------------------------------------------------------------------------------------------------
# the model: a random GQA + RoPE decoder (RMSNorm, gated MLP); attention is the only part that differs per step

def make_weights(shape: Shape, dtype: torch.dtype, device, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def randn(*dims, std):
        return (torch.randn(*dims, generator=g) * std).to(device=device, dtype=dtype)

    h, q_width, kv_width = shape.hidden, shape.heads_q * shape.head_dim, shape.heads_kv * shape.head_dim
    w = {"embed": randn(shape.vocab, h, std=1.0), "norm_f": 1 + randn(h, std=0.1),
         "lm_head": randn(h, shape.vocab, std=4 / math.sqrt(h))}
    for layer in range(shape.layers):
        w |= {f"{layer}.norm1": 1 + randn(h, std=0.1), f"{layer}.norm2": 1 + randn(h, std=0.1),
              f"{layer}.wqkv": randn(h, q_width + 2 * kv_width, std=1 / math.sqrt(h)),
              f"{layer}.wo": randn(q_width, h, std=1 / math.sqrt(q_width)),
              f"{layer}.gate_up": randn(h, 2 * shape.mlp, std=1 / math.sqrt(h)),
              f"{layer}.down": randn(shape.mlp, h, std=1 / math.sqrt(shape.mlp))}
    return w


def rms_norm(x, weight):
    return x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6).to(x.dtype) * weight


def rope(x, cos, sin):
    """x (..., H, D) rotated GPT-NeoX style by per-token cos / sin (..., D / 2)."""
    half = x.shape[-1] // 2
    c, s = cos[..., None, :], sin[..., None, :]
    return torch.cat((x[..., :half] * c - x[..., half:] * s, x[..., :half] * s + x[..., half:] * c), dim=-1)


class Model:
    def __init__(self, shape: Shape, dtype: torch.dtype, device, capacity: int):
        self.shape, self.w = shape, make_weights(shape, dtype, device)
        inv_freq = ROPE_BASE ** (-torch.arange(0, shape.head_dim, 2, dtype=torch.float64) / shape.head_dim)
        angles = torch.arange(capacity, dtype=torch.float64)[:, None] * inv_freq[None, :]
        self.cos, self.sin = angles.cos().to(device, dtype), angles.sin().to(device, dtype)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, attend) -> torch.Tensor:
        """Logits (N, V) of tokens (N,) at positions (N,); attend(layer, q (N, Hq, D), k, v (N, Hkv, D)) -> (N, Hq, D)
        is the step's attention (q and k already rotated)."""
        s, w = self.shape, self.w
        cos, sin = self.cos[positions], self.sin[positions]
        x = w["embed"][tokens]
        for layer in range(s.layers):
            qkv = rms_norm(x, w[f"{layer}.norm1"]) @ w[f"{layer}.wqkv"]
            q, k, v = qkv.split([s.heads_q * s.head_dim, s.heads_kv * s.head_dim, s.heads_kv * s.head_dim], -1)
            q = rope(q.view(-1, s.heads_q, s.head_dim), cos, sin)
            k = rope(k.view(-1, s.heads_kv, s.head_dim), cos, sin)
            x = x + attend(layer, q, k, v.view(-1, s.heads_kv, s.head_dim)).flatten(1) @ w[f"{layer}.wo"]
            gate, up = (rms_norm(x, w[f"{layer}.norm2"]) @ w[f"{layer}.gate_up"]).chunk(2, -1)
            x = x + (F.silu(gate) * up) @ w[f"{layer}.down"]
        return rms_norm(x, w["norm_f"]) @ w["lm_head"]


# ---------------------------------------------------------------------------------------------------------------
# one step: a mixed (prefill + decode) step through varlen, or a decode-only step through a CUDA graph

def mixed_step(model: Model, cache: PagedKVCache, ids: list, new_tokens: list[list[int]], chunk: int) -> torch.Tensor:
    """Feed new_tokens[b] to ids[b] (a prompt chunk, or the one token it decodes); (B, V) logits of each one's last
    new token."""
    num_new = [len(t) for t in new_tokens]
    cache.reserve(ids, num_new)
    cu_q, cu_k = cache.cu_seqlens(ids, num_new)
    table, positions = cache.block_table(ids), cache.positions(ids, num_new)

    def attend(layer, q, k, v):
        cache.write_packed(layer, ids, k, v, num_new)
        return flashcore.flash_attn_varlen_func(q, cache.k_pools[layer], cache.v_pools[layer], cu_q, cu_k, chunk,
                                                cache.capacity, causal=True, block_table=table)

    tokens = torch.tensor([t for chunk_tokens in new_tokens for t in chunk_tokens], device=cache.device)
    logits = model.forward(tokens, positions, attend)
    cache.commit(ids, num_new)
    ends = torch.tensor(num_new).cumsum(0) - 1
    return logits[ends.to(logits.device)]


class DecodeGraphs:
    """Decode-only steps replayed from CUDA graphs, one per padded batch size, captured on first use."""

    def __init__(self, model: Model, cache: PagedKVCache):
        self.model, self.cache, self.graphs = model, cache, {}
        cache.add_sequence(SCRATCH)
        cache.reserve([SCRATCH], 1)                 # its one block: padded rows append at position 0, forever

    def _decode(self, tokens, seqlens, table):
        """The decode step on static tensors: tokens (B,), seqlens (B,) int32 (tokens cached before this one),
        table (B, max_blocks) int32; the new k / v appended by flash_attn_with_kvcache."""
        cache = self.cache

        def attend(layer, q, k, v):
            return flashcore.flash_attn_with_kvcache(q[:, None], cache.k_pools[layer], cache.v_pools[layer],
                                                     k=k[:, None], v=v[:, None], cache_seqlens=seqlens,
                                                     block_table=table, causal=True)[:, 0]
        return self.model.forward(tokens, seqlens.long(), attend)

    def step(self, ids: list, last_tokens: list[int]) -> torch.Tensor:
        cache, batch = self.cache, len(ids)
        padded = 1 << (batch - 1).bit_length()
        cache.reserve(ids, 1)
        pad = padded - batch
        seqlens = F.pad(cache.seqlens(ids), (0, pad))                   # padded rows: 0 tokens cached
        table = torch.cat([cache.block_table(ids), cache.block_table([SCRATCH]).expand(pad, -1)])
        tokens = torch.tensor(last_tokens + [0] * pad, device=cache.device)
        if padded not in self.graphs:
            static = (tokens.clone(), seqlens.clone(), table.clone())
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):           # warm-up (compiles, kept plans) outside the capture
                self._decode(*static)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                logits = self._decode(*static)
            self.graphs[padded] = (graph, static, logits)
        graph, (s_tokens, s_seqlens, s_table), logits = self.graphs[padded]
        s_tokens.copy_(tokens), s_seqlens.copy_(seqlens), s_table.copy_(table)
        graph.replay()
        cache.commit(ids, 1)
        return logits[:batch]


# ---------------------------------------------------------------------------------------------------------------
# the loop

@dataclass
class Request:
    rid: int
    prompt: list[int]
    max_new: int
    arrival: float
    tokens: list[int] = field(default_factory=list)      # prompt + generated; the last one is not cached yet
    token_times: list[float] = field(default_factory=list)

    def __post_init__(self):
        self.tokens = list(self.prompt)

    @property
    def generated(self) -> list[int]:
        return self.tokens[len(self.prompt):]

    @property
    def done(self) -> bool:
        return len(self.generated) == self.max_new


def schedule(live: list[Request], cache: PagedKVCache, chunk: int, budget: int) -> list[tuple[Request, list[int]]]:
    """(request, new tokens) of a step: one token per decoding request, then prompt chunks, while the budget lasts."""
    pending = [(r, r.tokens[cache.length(r.rid):]) for r in live if not r.done]
    decoding = [(r, t) for r, t in pending if len(t) == 1]
    budget -= len(decoding)
    step = list(decoding)
    for r, tokens in pending:
        if len(tokens) > 1 and budget > 0:
            step.append((r, tokens[:min(chunk, budget)]))
            budget -= len(step[-1][1])
    return step


def make_requests(n: int, rate: float, vocab: int, max_prompt: int, max_new: int, seed: int) -> list[Request]:
    """n requests, Poisson arrivals at `rate` per second (0: all at once), prompt lengths 1..max_prompt."""
    g = torch.Generator().manual_seed(seed)
    gaps = torch.empty(n).exponential_(generator=g) / rate if rate > 0 else torch.zeros(n)
    arrivals = gaps.cumsum(0).tolist()
    return [Request(i, torch.randint(0, vocab, (int(torch.randint(1, max_prompt + 1, (1,), generator=g)),),
                                     generator=g).tolist(),
                    int(torch.randint(1, max_new + 1, (1,), generator=g)), arrivals[i]) for i in range(n)]


@dataclass
class Report:
    requests: list[Request]
    wall_s: float
    steps: int
    graph_steps: int

    @property
    def output_tokens(self) -> int:
        return sum(len(r.generated) for r in self.requests)

    def time_per_output_token(self) -> float:
        spans = [(r.token_times[-1] - r.token_times[0]) / (len(r.token_times) - 1) for r in self.requests
                 if len(r.token_times) > 1]
        return sum(spans) / len(spans) if spans else float("nan")

    def summary(self) -> str:
        return (f"{len(self.requests)} requests, {self.output_tokens} output tokens in {self.wall_s:.2f} s over "
                f"{self.steps} steps ({self.graph_steps} from CUDA graphs): {self.output_tokens / self.wall_s:.1f} "
                f"output tokens/s, {1e3 * self.time_per_output_token():.2f} ms per output token")


def serve(shape: Shape, requests: list[Request], dtype: torch.dtype, device, block_size: int = 16,
          num_blocks: int = 512, chunk: int = 256, token_budget: int = 512, graphs: bool = True) -> Report:
    """Run `requests` to completion (each arrives at its `arrival` seconds after the start)."""
    capacity = max(len(r.prompt) + r.max_new for r in requests)
    cache = PagedKVCache(shape.layers, num_blocks, block_size, shape.heads_kv, shape.head_dim, dtype=dtype,
                         device=device, max_seqlen=capacity)
    model = Model(shape, dtype, device, cache.capacity)
    decode_graphs = DecodeGraphs(model, cache) if graphs and torch.device(device).type == "cuda" else None
    waiting, live, finished = sorted(requests, key=lambda r: r.arrival), [], []
    start, steps, graph_steps = time.perf_counter(), 0, 0
    while waiting or live:
        now = time.perf_counter() - start
        while waiting and waiting[0].arrival <= now:
            cache.add_sequence(waiting[0].rid)
            live.append(waiting.pop(0))
        batch = schedule(live, cache, chunk, token_budget)
        if not batch:                               # nothing to run until the next arrival
            time.sleep(max(0.0, waiting[0].arrival - now) if waiting else 0.0)
            continue
        ids = [r.rid for r, _ in batch]
        if decode_graphs is not None and all(len(t) == 1 for _, t in batch):
            logits = decode_graphs.step(ids, [t[0] for _, t in batch])
            graph_steps += 1
        else:
            logits = mixed_step(model, cache, ids, [t for _, t in batch], chunk)
        steps += 1
        next_tokens = logits.argmax(-1).tolist()      # (the step's one sync)
        stamp = time.perf_counter() - start
        for (request, _), token in zip(batch, next_tokens):
            if cache.length(request.rid) == len(request.tokens):     # its known tokens are in: a new one is out
                request.tokens.append(token)
                request.token_times.append(stamp)
        for request in [r for r in live if r.done]:
            cache.free(request.rid)
            live.remove(request)
            finished.append(request)
    return Report(sorted(finished, key=lambda r: r.rid), time.perf_counter() - start, steps, graph_steps)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=SHAPES, default="tiny")
    p.add_argument("--requests", type=int, default=12)
    p.add_argument("--rate", type=float, default=0.0, help="arrivals per second (0: all at once)")
    p.add_argument("--max-prompt", type=int, default=300)
    p.add_argument("--max-new", type=int, default=16)
    p.add_argument("--chunk", type=int, default=128, help="prompt tokens a request prefills per step at most")
    p.add_argument("--token-budget", type=int, default=256, help="tokens one step packs at most")
    p.add_argument("--no-graphs", action="store_true", help="decode-only steps eagerly too")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32       # (the CPU interpreter: fp32)
    shape = SHAPES[args.model]
    requests = make_requests(args.requests, args.rate, shape.vocab, args.max_prompt, args.max_new, seed=0)
    report = serve(shape, requests, dtype, "cuda" if cuda else "cpu", chunk=args.chunk,
                   token_budget=args.token_budget, graphs=not args.no_graphs)
    print(report.summary())


if __name__ == "__main__":
    main()
