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

--attention sdpa runs the same loop (scheduler, PagedKVCache storage, model, CUDA graphs) with
torch.nn.functional.scaled_dot_product_attention in place of FlashCore's two calls, as an engineer without a paged
kernel would write it: the new k / v are stored as before (write_packed's indexed assignment), then each step's
keys are gathered from the pools through the block table into a dense batch, and SDPA attends under a boolean mask
(causal, and nothing past a sequence's length). A mixed step makes two dense batches, the decoding sequences (one
query each) and the prefilling ones (queries padded to the longest chunk), since padding a decode row to a chunk's
length would multiply its work. Decode-only steps are CUDA-graph captured too, one graph per padded batch size and
key length, the keys gathered up to the longest sequence rounded up to KEY_BUCKET tokens. GQA: the query heads that
share a kv head are folded into the query length (SDPA's enable_gqa with a mask runs only on its math backend, and
repeating k / v per query head copies them Hq / Hkv times).

Printed at the end: requests, output tokens, wall time, output tokens/s, and the mean time per output token
(a request's time from its first output token to its last, over its output tokens after the first).

    python examples/serve.py --model small --sweep 8,32,128 --attention flashcore,sdpa --max-prompt 512 \
        --max-new 128 --json serve.json

runs, for each count, that many requests arriving at once through each attention (same process, same card; a
warm-up pass of the same requests first compiles the kernels and captures the graphs), then prints a markdown
table of the figures and writes them to the JSON file.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import time
from collections.abc import Hashable
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
ATTENTIONS = ("flashcore", "sdpa")
ROPE_BASE = 10000.0
SCRATCH = "<scratch>"      # the sequence padded decode rows write into
KEY_BUCKET = 128           # SDPA decode graphs gather keys in multiples of this many tokens (a graph per multiple)


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
# attention over the paged cache: FlashCore's varlen call, or SDPA over keys gathered into a dense batch

def varlen_attention(cache: PagedKVCache, ids: list, num_new: list[int], chunk: int):
    """attend(layer, q, k, v) of a step through flash_attn_varlen_func on the pools (the new tokens reserved)."""
    cu_q, cu_k = cache.cu_seqlens(ids, num_new)
    table = cache.block_table(ids)

    def attend(layer, q, k, v):
        cache.write_packed(layer, ids, k, v, num_new)
        return flashcore.flash_attn_varlen_func(q, cache.k_pools[layer], cache.v_pools[layer], cu_q, cu_k, chunk,
                                                cache.capacity, causal=True, block_table=table)
    return attend


def paged_sdpa(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, table: torch.Tensor,
               visible: torch.Tensor) -> torch.Tensor:
    """SDPA of q (B, Lq, Hq, D) over the keys of table (B, n) gathered from the pools, (B, n * block_size) each;
    visible (B, Lq, n * block_size) bool says which keys a query sees (every row sees one at least: SDPA's output
    is NaN for a row that sees none). Returns (B, Lq, Hq, D). Query head h reads kv head h // (Hq / Hkv), as in
    flash-attn; the Hq / Hkv heads of a group are folded into the query length, so that k and v are read once per
    kv head, under the same mask repeated."""
    b, lq, hq, d = q.shape
    hkv = k_pool.shape[2]
    group = hq // hkv
    k = k_pool[table].flatten(1, 2).transpose(1, 2)                 # (B, Hkv, Lk, D)
    v = v_pool[table].flatten(1, 2).transpose(1, 2)
    q = q.view(b, lq, hkv, group, d).permute(0, 2, 3, 1, 4).reshape(b, hkv, group * lq, d)
    mask = visible[:, None, None].expand(b, 1, group, lq, -1).reshape(b, 1, group * lq, -1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.view(b, hkv, group, lq, d).permute(0, 3, 1, 2, 4).reshape(b, lq, hq, d)


def sdpa_attention(cache: PagedKVCache, ids: list, num_new: list[int]):
    """attend(layer, q, k, v) of a step through SDPA (the new tokens reserved, not committed): write_packed stores
    the new k / v, then the decoding sequences (one new token) and the prefilling ones each form a dense batch,
    queries padded to the batch's longest run and keys gathered up to its longest sequence. A padded query repeats
    its sequence's last new token (row and position), so that it sees keys; its output is dropped."""
    lengths = [cache.length(s) for s in ids]
    starts = [0, *itertools.accumulate(num_new)]
    batches, unpad, offset = [], [0] * starts[-1], 0      # unpad[r]: packed row r's row in the batches' outputs
    for members in ([b for b, n in enumerate(num_new) if n == 1], [b for b, n in enumerate(num_new) if n > 1]):
        if not members:
            continue
        width = max(num_new[b] for b in members)
        last = [[min(i, num_new[b] - 1) for i in range(width)] for b in members]
        rows = torch.tensor([[starts[b] + i for i in run] for b, run in zip(members, last)], device=cache.device)
        query_pos = torch.tensor([[lengths[b] + i for i in run] for b, run in zip(members, last)],
                                 device=cache.device)
        blocks = math.ceil(max(lengths[b] + num_new[b] for b in members) / cache.block_size)
        table = cache.block_table([ids[b] for b in members])[:, :blocks]
        visible = torch.arange(blocks * cache.block_size, device=cache.device) <= query_pos[..., None]
        batches.append((rows, table, visible))
        for j, b in enumerate(members):
            unpad[starts[b]:starts[b + 1]] = range(offset + j * width, offset + j * width + num_new[b])
        offset += len(members) * width
    unpad = torch.tensor(unpad, device=cache.device)

    def attend(layer, q, k, v):
        cache.write_packed(layer, ids, k, v, num_new)
        outs = [paged_sdpa(q[rows], cache.k_pools[layer], cache.v_pools[layer], table, visible).flatten(0, 1)
                for rows, table, visible in batches]
        return torch.cat(outs)[unpad]
    return attend


# ---------------------------------------------------------------------------------------------------------------
# one step: a mixed (prefill + decode) step, or a decode-only step through a CUDA graph

def mixed_step(model: Model, cache: PagedKVCache, ids: list, new_tokens: list[list[int]], chunk: int,
               attention: str = "flashcore") -> torch.Tensor:
    """Feed new_tokens[b] to ids[b] (a prompt chunk, or the one token it decodes); (B, V) logits of each one's last
    new token."""
    num_new = [len(t) for t in new_tokens]
    cache.reserve(ids, num_new)
    positions = cache.positions(ids, num_new)
    attend = (sdpa_attention(cache, ids, num_new) if attention == "sdpa"
              else varlen_attention(cache, ids, num_new, chunk))
    tokens = torch.tensor([t for chunk_tokens in new_tokens for t in chunk_tokens], device=cache.device)
    logits = model.forward(tokens, positions, attend)
    cache.commit(ids, num_new)
    ends = torch.tensor(num_new).cumsum(0) - 1
    return logits[ends.to(logits.device)]


class DecodeGraphs:
    """Decode-only steps replayed from CUDA graphs, one per static shape, captured on first use. flashcore: a graph
    per padded batch size; flash_attn_with_kvcache appends the new k / v and attends. sdpa: a graph per padded
    batch size and key bucket; the new k / v are stored by write_packed's indexed assignment (on a static slot
    map: write_packed builds its own from the host each call), then paged_sdpa over the bucket's keys."""

    def __init__(self, model: Model, cache: PagedKVCache, attention: str = "flashcore"):
        self.model, self.cache, self.attention, self.graphs = model, cache, attention, {}
        cache.add_sequence(SCRATCH)
        cache.reserve([SCRATCH], 1)                 # its one block: padded rows append at position 0, forever

    def inputs(self, ids: list, last_tokens: list[int]) -> tuple[Hashable, tuple[torch.Tensor, ...]]:
        """Reserve each sequence's next token; the step's graph key and its inputs, shaped as the graph's static
        ones: tokens (B,), seqlens (B,) int32 (tokens cached before this one), table (B, blocks) int32, and for
        sdpa the new token's slots (B,). Rows past the real batch point at the scratch sequence."""
        cache, batch = self.cache, len(ids)
        padded = 1 << (batch - 1).bit_length()
        cache.reserve(ids, 1)
        pad = padded - batch
        seqlens = F.pad(cache.seqlens(ids), (0, pad))                   # padded rows: 0 tokens cached
        table = torch.cat([cache.block_table(ids), cache.block_table([SCRATCH]).expand(pad, -1)])
        tokens = torch.tensor(last_tokens + [0] * pad, device=cache.device)
        if self.attention == "flashcore":
            return padded, (tokens, seqlens, table)
        bucket = max(1, KEY_BUCKET // cache.block_size)
        needed = math.ceil((max(cache.length(s) for s in ids) + 1) / cache.block_size)
        blocks = min(cache.max_blocks_per_seq, math.ceil(needed / bucket) * bucket)
        slots = torch.cat([cache.slot_mapping(ids, 1), cache.slot_mapping([SCRATCH], 1).expand(pad)])
        return (padded, blocks), (tokens, seqlens, table[:, :blocks].contiguous(), slots)

    def decode(self, tokens, seqlens, table, slots=None) -> torch.Tensor:
        """The decode step on static inputs (`inputs`' tensors): (B, V) logits."""
        cache = self.cache
        if self.attention == "flashcore":
            def attend(layer, q, k, v):
                return flashcore.flash_attn_with_kvcache(q[:, None], cache.k_pools[layer], cache.v_pools[layer],
                                                         k=k[:, None], v=v[:, None], cache_seqlens=seqlens,
                                                         block_table=table, causal=True)[:, 0]
        else:
            # (B, 1, Lk): the cached tokens and the new one, at position seqlens
            visible = (torch.arange(table.shape[1] * cache.block_size, device=cache.device)
                       <= seqlens[:, None])[:, None]

            def attend(layer, q, k, v):
                for pool, new in ((cache.k_pools[layer], k), (cache.v_pools[layer], v)):
                    pool.view(-1, *new.shape[1:])[slots] = new
                return paged_sdpa(q[:, None], cache.k_pools[layer], cache.v_pools[layer], table, visible)[:, 0]
        return self.model.forward(tokens, seqlens.long(), attend)

    def step(self, ids: list, last_tokens: list[int]) -> torch.Tensor:
        key, inputs = self.inputs(ids, last_tokens)
        if key not in self.graphs:
            static = tuple(t.clone() for t in inputs)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):           # warm-up (compiles, kept plans) outside the capture
                self.decode(*static)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                logits = self.decode(*static)
            self.graphs[key] = (graph, static, logits)
        graph, static, logits = self.graphs[key]
        for target, value in zip(static, inputs):
            target.copy_(value)
        graph.replay()
        self.cache.commit(ids, 1)
        return logits[:len(ids)]


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
    attention: str
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

    def figures(self) -> dict:
        return {"attention": self.attention, "requests": len(self.requests), "output_tokens": self.output_tokens,
                "wall_s": self.wall_s, "steps": self.steps, "graph_steps": self.graph_steps,
                "output_tokens_per_s": self.output_tokens / self.wall_s,
                "ms_per_output_token": 1e3 * self.time_per_output_token()}

    def summary(self) -> str:
        return (f"{self.attention}: {len(self.requests)} requests, {self.output_tokens} output tokens in "
                f"{self.wall_s:.2f} s over {self.steps} steps ({self.graph_steps} from CUDA graphs): "
                f"{self.output_tokens / self.wall_s:.1f} output tokens/s, "
                f"{1e3 * self.time_per_output_token():.2f} ms per output token")


def run(model: Model, cache: PagedKVCache, decode_graphs: DecodeGraphs | None, requests: list[Request], chunk: int,
        token_budget: int, attention: str) -> Report:
    """Run `requests` to completion (each arrives at its `arrival` seconds after the start)."""
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
            logits = mixed_step(model, cache, ids, [t for _, t in batch], chunk, attention)
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
    return Report(attention, sorted(finished, key=lambda r: r.rid), time.perf_counter() - start, steps, graph_steps)


def serve(shape: Shape, requests: list[Request], dtype: torch.dtype, device, block_size: int = 16,
          num_blocks: int | None = None, chunk: int = 256, token_budget: int = 512, graphs: bool = True,
          attention: str = "flashcore", warmup: bool = False) -> Report:
    """Run `requests` to completion with attention through `attention` ("flashcore" or "sdpa"). num_blocks: the
    pool's, by default enough for every request at once (nothing is preempted). warmup: first run copies of the
    requests, untimed, on the same cache and model: with the same requests the timed run takes the same steps, so
    its kernels are compiled and its decode graphs captured before the clock starts (arrivals at rate > 0 may
    still schedule a step the warm-up did not)."""
    capacity = max(len(r.prompt) + r.max_new for r in requests)
    if num_blocks is None:                          # (+ 1: the scratch sequence's block)
        num_blocks = sum(math.ceil((len(r.prompt) + r.max_new) / block_size) for r in requests) + 1
    cache = PagedKVCache(shape.layers, num_blocks, block_size, shape.heads_kv, shape.head_dim, dtype=dtype,
                         device=device, max_seqlen=capacity)
    model = Model(shape, dtype, device, cache.capacity)
    decode_graphs = (DecodeGraphs(model, cache, attention) if graphs and torch.device(device).type == "cuda"
                     else None)
    if warmup:
        copies = [Request(r.rid, r.prompt, r.max_new, r.arrival) for r in requests]
        run(model, cache, decode_graphs, copies, chunk, token_budget, attention)
    return run(model, cache, decode_graphs, requests, chunk, token_budget, attention)


def markdown_table(rows: list[dict]) -> str:
    lines = ["| concurrent requests | attention | output tokens | output tokens/s | ms per output token | "
             "steps (from graphs) |", "|---:|---|---:|---:|---:|---:|"]
    lines += [f"| {r['requests']} | {r['attention']} | {r['output_tokens']} | {r['output_tokens_per_s']:.0f} | "
              f"{r['ms_per_output_token']:.2f} | {r['steps']} ({r['graph_steps']}) |" for r in rows]
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=SHAPES, default="tiny")
    p.add_argument("--attention", default="flashcore",
                   help=f"comma-separated, each run on the same requests: {', '.join(ATTENTIONS)}")
    p.add_argument("--requests", type=int, default=12)
    p.add_argument("--rate", type=float, default=0.0, help="arrivals per second (0: all at once)")
    p.add_argument("--sweep", help="comma-separated request counts, each arriving at once (--requests and --rate "
                                   "ignored), after a warm-up pass; prints a markdown table")
    p.add_argument("--json", help="write the runs' figures to this file")
    p.add_argument("--max-prompt", type=int, default=300)
    p.add_argument("--max-new", type=int, default=16)
    p.add_argument("--chunk", type=int, default=128, help="prompt tokens a request prefills per step at most")
    p.add_argument("--token-budget", type=int, default=256, help="tokens one step packs at most")
    p.add_argument("--no-graphs", action="store_true", help="decode-only steps eagerly too")
    args = p.parse_args(argv)
    attentions = args.attention.split(",")
    if unknown := set(attentions) - set(ATTENTIONS):
        p.error(f"--attention: unknown {', '.join(sorted(unknown))} (choose from {', '.join(ATTENTIONS)})")
    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32       # (the CPU interpreter: fp32)
    shape = SHAPES[args.model]
    runs = [(int(n), 0.0) for n in args.sweep.split(",")] if args.sweep else [(args.requests, args.rate)]
    rows = []
    for count, rate in runs:
        for attention in attentions:
            requests = make_requests(count, rate, shape.vocab, args.max_prompt, args.max_new, seed=0)
            report = serve(shape, requests, dtype, "cuda" if cuda else "cpu", chunk=args.chunk,
                           token_budget=args.token_budget, graphs=not args.no_graphs, attention=attention,
                           warmup=bool(args.sweep))
            print(report.summary())
            rows.append(report.figures())
    if args.sweep:
        print(markdown_table(rows))
    if args.json:
        setup = {"model": args.model, "dtype": str(dtype).removeprefix("torch."),
                 "device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
                 "rate": args.rate if not args.sweep else 0.0, "max_prompt": args.max_prompt,
                 "max_new": args.max_new, "chunk": args.chunk, "token_budget": args.token_budget,
                 "graphs": cuda and not args.no_graphs, "warmup": bool(args.sweep)}
        with open(args.json, "w") as f:
            json.dump({**setup, "runs": rows}, f, indent=1)


if __name__ == "__main__":
    main()
