"""attn_decode's suites for flashcore-bench: the decode matrix, timed eager and as CUDA-graph replays, and the host
overhead of one decode call.

decode        bf16, Hq 32 / Hkv 8, D 128, one query token per sequence: batch 1/4/16/64 x cache 1k/8k/32k/128k
              tokens per sequence, then a ragged batch (64 sequences, cache lengths drawn from 512..32k with a fixed
              seed), each in three cache layouts: contiguous (B, S, Hkv, D), paged with 16- and 128-token blocks
              (block tables shuffled). A point whose tensors (FlashCore's cache and the peers' dense copy) would
              exceed --decode-mem-gib is left out. GB/s counts the K and V bytes of the keys each sequence attends:
              sum over sequences of seqlen_k * Hkv * D * 2 (K and V) * 2 bytes.
              Implementations, each on the same values in its own layout, built outside timing:
                flashcore   flashcore.flash_attn_with_kvcache (cache_seqlens, block_table), dispatch's config
                default     FlashCore again with the op's heuristic default config (the tuned/default column)
                cudnn/flash SDPA with that backend forced, enable_gqa, on a dense (B, Hkv, S_max, D) copy: a ragged
                            batch padded to its longest sequence with no mask (the padded batch a dense-cache
                            server runs; GB/s still counts only the real keys)
                flex        FlexAttention on the dense copy, compiled once per shape for the whole run; a ragged
                            batch masks each sequence's padding with a block mask
                flashinfer  FlashInfer's BatchDecodeWithPagedKVCacheWrapper (tensor cores, NHD), planned once per
                            case; pages are the case's blocks, a contiguous cache is read as pages of 128 tokens
                            (B < 16) or one page per sequence (B >= 16), its faster choice on the H100 (ANCHORS.md)
                fa4         flash-attn 4 (flash_attn.cute): dense, or seqused_k / page_table; num_splits=1 (sm90)
              A peer that is not installed or cannot run a case is n/a.
decode-graph  the same cases and implementations, each call captured once in a CUDA graph (after one eager warm-up
              call) and timed as graph replays: no host cost, no value-check sync. A peer that cannot be captured
              is n/a. FC/best compares graph with graph.
decode-host   eager host cost of one decode call, FlashCore against SDPA (PyTorch's backend choice) on a dense
              cache: B 1 and 16, cache 8k, Hq 32 / Hkv 8, D 128, bf16, contiguous and paged 16, with and without
              appending one new token (SDPA appends with index_copy_, as a static-cache server does).

FlashCore's output is checked once per case against the float64 reference (flashcore/reference.py), on the first
and last sequences of the batch (keys gathered from the cache as the call saw them, plus any appended token).

    flashcore-bench --op attn_decode --list
    flashcore-bench --op attn_decode --suite decode,decode-graph --out $OUT --warmup-ms 10 --rep-ms 40
    flashcore-bench --suite decode --decode-quick --out $OUT          # smoke: B 1/16, 8k, contiguous + paged 16
    flashcore-bench --suite decode-host --out $OUT
"""
from __future__ import annotations

import argparse
import random
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable

import torch

from flashcore.dtypes import ELEM_BYTES, TORCH_DTYPES
from flashcore.reference import max_error
from flashcore.tools.bench_suite import Case, Prepared, Suite, or_failing, verdict

from ..bench_common import (flashinfer_csr, flashinfer_workspace, import_flashinfer, peer_versions, shuffled_table,
                            value_checks_note)

HEADS_Q, HEADS_KV, HEAD_DIM, DTYPE = 32, 8, 128, "bf16"
BATCHES = (1, 4, 16, 64)
CACHES = (1024, 8192, 32768, 131072)
LAYOUTS = {"contiguous": 0, "paged16": 16, "paged128": 128}       # option value -> block size (0: contiguous)
RAGGED_BATCH, RAGGED_MIN, RAGGED_MAX, RAGGED_SEED = 64, 512, 32768, 0
MEM_GIB = 40.0
# Per-sequence capacity is the longest sequence rounded up to this: whole blocks of 16 and 128, whole FlashInfer pages
CAPACITY_ALIGN = 128
FLASHINFER_PAGE = 128          # FlashInfer's page on a contiguous cache below FLASHINFER_WHOLE_BATCH sequences
FLASHINFER_WHOLE_BATCH = 16    # from this batch on, one page per sequence
FLEX_RECOMPILE_LIMIT = 64      # one static-shape compile per (batch, cache) shape of the run, plus the ragged masks
PEERS = ("cudnn", "flash", "flex", "flashinfer", "fa4")
DENSE_PEERS = ("cudnn", "flash", "flex")     # the peers that read the dense (B, Hkv, S_max, D) copy
# CUDA-graph peers by default: the first capture of a case with FlashInfer and Flex among the peers failed with
# "operation not supported on global/shared address space" and took the CUDA context down (which one: not isolated)
GRAPH_PEERS = ("cudnn", "flash")
SDPA_BACKENDS = {"cudnn": "CUDNN_ATTENTION", "flash": "FLASH_ATTENTION"}
LABELS = {"flashcore": "FlashCore", "default": "FC-default", "cudnn": "cuDNN", "flash": "SDPA-flash", "flex": "Flex",
          "flashinfer": "FlashInfer", "fa4": "FA4", "sdpa": "SDPA"}
QUICK = {"decode_batches": "1,16", "decode_caches": "8192", "decode_layouts": "contiguous,paged16"}
HOST_BATCHES, HOST_CACHE, HOST_LAYOUTS = (1, 16), 8192, ("contiguous", "paged16")


# ---------------------------------------------------------------------------------------------- cases

@dataclass(frozen=True)
class DecodeCase:
    """One decode call: q (batch, 1, heads_q, head_dim) against each sequence's cache, after appending seqlen_new
    tokens (the host suite)."""
    batch: int
    cache_len: int                     # keys each sequence attends; a ragged batch: its longest sequence
    page_size: int = 0                 # 0: contiguous cache (batch, capacity, Hkv, D); n: paged, n-token blocks
    seqlens: tuple[int, ...] = ()      # a ragged batch's keys per sequence; (): every sequence has cache_len
    seqlen_new: int = 0                # tokens the call appends (counted in the keys it attends)
    heads_q: int = HEADS_Q
    heads_kv: int = HEADS_KV
    head_dim: int = HEAD_DIM
    dtype: str = DTYPE

    def lengths(self) -> list[int]:
        """Keys sequence b attends (after the append), for every b."""
        return list(self.seqlens) if self.seqlens else [self.cache_len] * self.batch

    @property
    def capacity(self) -> int:
        """Cache tokens per sequence: whole blocks, whole FlashInfer pages."""
        return -(-self.cache_len // CAPACITY_ALIGN) * CAPACITY_ALIGN

    @property
    def token_bytes(self) -> int:
        """Bytes of K and V of one token."""
        return 2 * self.heads_kv * self.head_dim * ELEM_BYTES[self.dtype]

    @property
    def kv_bytes(self) -> int:
        """Bytes of K and V one call reads (GB/s counts these): the keys each sequence attends, once."""
        return sum(self.lengths()) * self.token_bytes

    def blocks_used(self) -> list[int]:
        """Blocks of a paged cache each sequence fills (its keys, rounded up to whole blocks)."""
        return [-(-n // self.page_size) for n in self.lengths()]

    def cache_bytes(self) -> int:
        """FlashCore's cache: every sequence's capacity (contiguous) or the blocks the sequences use (paged)."""
        if not self.page_size:
            return self.batch * self.capacity * self.token_bytes
        return sum(self.blocks_used()) * self.page_size * self.token_bytes

    def dense_bytes(self) -> int:
        """The dense (B, Hkv, S_max, D) copy that SDPA and FlexAttention read: the batch padded to its longest."""
        return self.batch * self.cache_len * self.token_bytes

    def layout(self) -> str:
        return f"paged {self.page_size}" if self.page_size else "contiguous"


def ragged_lengths(batch: int = RAGGED_BATCH, low: int = RAGGED_MIN, high: int = RAGGED_MAX,
                   seed: int = RAGGED_SEED) -> tuple[int, ...]:
    """Cache lengths of the ragged batch: uniform in [low, high], the same on every machine and run."""
    draw = random.Random(seed)
    return tuple(draw.randint(low, high) for _ in range(batch))


def _tokens(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def case_of(case: DecodeCase) -> Case:
    """The table row of a decode call."""
    cache = f"{min(case.seqlens)}..{max(case.seqlens)}" if case.seqlens else _tokens(case.cache_len)
    columns = [("B", str(case.batch)), ("cache", cache), ("layout", case.layout()), ("append", str(case.seqlen_new))]
    label = (f"B={case.batch:<2} cache={cache:>11} {case.layout():10} H={case.heads_q}/{case.heads_kv} "
             f"D={case.head_dim} {case.dtype}" + (f" +{case.seqlen_new} new" if case.seqlen_new else ""))
    return Case(case, tuple(columns), label, work=float(case.kv_bytes))


def _int_list(text: str, option: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x]
    except ValueError:
        raise ValueError(f"{option}: comma list of positive integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise ValueError(f"{option}: comma list of positive integers, got {text!r}")
    return values


def build_matrix(batches, caches, layouts, ragged: bool, mem_gib: float, dense: bool) -> tuple[list, list]:
    """(kept, left out): per layout, every (batch, cache) then the ragged batch; a case is left out when FlashCore's
    cache plus (if `dense`, some dense peer runs) the dense copy would exceed mem_gib."""
    kept, left_out = [], []
    for layout in layouts:
        page = LAYOUTS[layout]
        cases = [DecodeCase(b, s, page) for b in batches for s in caches]
        if ragged:
            lengths = ragged_lengths()
            cases.append(DecodeCase(len(lengths), max(lengths), page, seqlens=lengths))
        for case in cases:
            fits = case.cache_bytes() + (case.dense_bytes() if dense else 0) <= mem_gib * 2 ** 30
            (kept if fits else left_out).append(case)
    return kept, left_out


def host_cases() -> list[DecodeCase]:
    return [DecodeCase(b, HOST_CACHE, LAYOUTS[layout], seqlen_new=new)
            for layout in HOST_LAYOUTS for b in HOST_BATCHES for new in (0, 1)]


# ---------------------------------------------------------------------------------------------- inputs

@dataclass
class DecodeInputs:
    """One case's tensors, on one device, dtype of the case unless said otherwise."""
    q: torch.Tensor                       # (B, 1, Hq, D)
    k_cache: torch.Tensor                 # FlashCore's: (B, capacity, Hkv, D) or (num_blocks, page_size, Hkv, D)
    v_cache: torch.Tensor
    block_table: torch.Tensor | None      # (B, capacity // page_size) int32, shuffled; unused entries 0
    cache_seqlens: torch.Tensor           # (B,) int32: tokens in each cache before the call
    seqlens_k: torch.Tensor               # (B,) int32: keys each sequence attends (cache_seqlens + seqlen_new)
    k_new: torch.Tensor | None            # (B, seqlen_new, Hkv, D)
    v_new: torch.Tensor | None
    k_dense: torch.Tensor | None          # (B, Hkv, S_max, D): the same cache values, padded batch, contiguous
    v_dense: torch.Tensor | None
    q_dense: torch.Tensor | None          # (B, Hq, 1, D) contiguous: q in SDPA's layout


def shuffled_block_table(case: DecodeCase) -> torch.Tensor:
    """(B, capacity // page_size) int32 on the CPU: the blocks sequence b uses (enough for its keys) are distinct
    blocks of a pool holding just those, in random order (torch's global seed); the entries past them are 0
    (never read)."""
    return shuffled_table(case.blocks_used(), case.capacity // case.page_size)


def dense_copy(case: DecodeCase, cache: torch.Tensor, block_table: torch.Tensor | None) -> torch.Tensor:
    """(B, Hkv, S_max, D) contiguous: sequence b's first S_max cache positions (whatever a shorter one holds past
    its length: the padding SDPA reads)."""
    if block_table is None:
        rows = cache[:, :case.cache_len]
    else:
        rows = cache[block_table.long()].flatten(1, 2)[:, :case.cache_len]   # (B, capacity, Hkv, D), then cut
    return rows.transpose(1, 2).contiguous()


def make_inputs(case: DecodeCase, device: str | torch.device = "cuda", dense: bool = True) -> DecodeInputs:
    """Random q, cache and new tokens (torch's global seed); `dense`: also the (B, Hkv, S_max, D) copies."""
    dtype = TORCH_DTYPES[case.dtype]
    lengths = case.lengths()
    kv_shape = (case.heads_kv, case.head_dim)
    q = torch.randn(case.batch, 1, case.heads_q, case.head_dim, device=device, dtype=dtype)
    if case.page_size:
        block_table = shuffled_block_table(case).to(device)
        rows = (sum(case.blocks_used()), case.page_size)
    else:
        rows, block_table = (case.batch, case.capacity), None
    k_cache = torch.randn(*rows, *kv_shape, device=device, dtype=dtype)
    v_cache = torch.randn(*rows, *kv_shape, device=device, dtype=dtype)
    seqlens_k = torch.tensor(lengths, dtype=torch.int32, device=device)
    new = None
    if case.seqlen_new:
        new = [torch.randn(case.batch, case.seqlen_new, *kv_shape, device=device, dtype=dtype) for _ in range(2)]
    return DecodeInputs(
        q, k_cache, v_cache, block_table, seqlens_k - case.seqlen_new, seqlens_k,
        *(new or (None, None)),
        dense_copy(case, k_cache, block_table) if dense else None,
        dense_copy(case, v_cache, block_table) if dense else None,
        q.transpose(1, 2).clone(memory_format=torch.contiguous_format) if dense else None)


def sequence_keys(case: DecodeCase, inputs: DecodeInputs, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(k, v) each (1, seqlen_k[b], Hkv, D): the keys sequence b attends, its cache positions below cache_seqlens[b]
    read from the cache (a call never writes there) followed by its new tokens."""
    cached = int(inputs.cache_seqlens[b])
    out = []
    for cache, new in ((inputs.k_cache, inputs.k_new), (inputs.v_cache, inputs.v_new)):
        if inputs.block_table is None:
            rows = cache[b, :cached]
        else:
            blocks = inputs.block_table[b, :-(-cached // case.page_size)].long()
            rows = cache[blocks].flatten(0, 1)[:cached]
        if new is not None:
            rows = torch.cat([rows, new[b]])
        out.append(rows[None])
    return out[0], out[1]


def check_against_reference(case: DecodeCase, inputs: DecodeInputs, run: Callable[[], torch.Tensor]) -> dict:
    """FlashCore's output (B, 1, Hq, D) from `run`, its first and last sequences against the float64 reference
    with the shared tolerance rule; the sequence furthest over (or nearest to) its tolerance is reported."""
    out = run()
    return verdict(max_error(out[b:b + 1], inputs.q[b:b + 1], *sequence_keys(case, inputs, b))
                   for b in sorted({0, case.batch - 1}))


# ---------------------------------------------------------------------------------------------- FlashCore

def flashcore_call(inputs: DecodeInputs) -> Callable[[], torch.Tensor]:
    """The public call, with the config dispatch picks; appends k_new / v_new when the case has them."""
    import flashcore
    api = flashcore.flash_attn_with_kvcache
    q, k_cache, v_cache = inputs.q, inputs.k_cache, inputs.v_cache
    kwargs = dict(k=inputs.k_new, v=inputs.v_new, cache_seqlens=inputs.cache_seqlens, block_table=inputs.block_table)
    return lambda: api(q, k_cache, v_cache, **kwargs)


def flashcore_default(inputs: DecodeInputs) -> Callable[[], torch.Tensor]:
    """The op's host function with the heuristic default config (FLASHCORE_TUNING=off is read once per process, so
    it cannot serve one column), arguments as flash_attn_with_kvcache passes them for this call."""
    from . import OP, host
    tensors = dict(q=inputs.q, k_cache=inputs.k_cache, block_table=inputs.block_table, k_new=inputs.k_new,
                   alibi=None)
    config = OP.default_config(host.runtime_spec(host.call_of(tensors, False, False, False), inputs.q))
    q, k_cache, v_cache = inputs.q, inputs.k_cache, inputs.v_cache
    kwargs = dict(k_new=inputs.k_new, v_new=inputs.v_new, cos=None, sin=None, cache_seqlens=inputs.cache_seqlens,
                  cache_seqlen=0, cache_batch_idx=None, cache_leftpad=None, block_table=inputs.block_table,
                  softmax_scale=q.shape[-1] ** -0.5, causal=False, window_left=-1, window_right=-1, softcap=0.0,
                  rotary_interleaved=True, alibi_slopes=None, num_splits=0, return_lse=False, config=config)
    return lambda: host.decode_attention(q, k_cache, v_cache, **kwargs)[0]


# ---------------------------------------------------------------------------------------------- peers

def _dense(inputs: DecodeInputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q (B, Hq, 1, D), k, v (B, Hkv, S_max, D)): SDPA's and FlexAttention's layout."""
    if inputs.k_dense is None:
        raise RuntimeError("no dense copy of the cache was built for this case")
    return inputs.q_dense, inputs.k_dense, inputs.v_dense


def sdpa(inputs: DecodeInputs, backend: str | None = None) -> Callable[[], torch.Tensor]:
    """F.scaled_dot_product_attention with enable_gqa on the dense copy (every padded key attended); `backend`
    (cudnn, flash) forces one, None leaves the choice to PyTorch. A backend that cannot take the case raises on
    the call (n/a)."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    q, k, v = _dense(inputs)
    if backend is None:
        return lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    forced = getattr(SDPBackend, SDPA_BACKENDS[backend])

    def run():
        # entered per call (a few us of host time): the harness's L2 flush before each timed call covers it
        with sdpa_kernel(forced):
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    return run


def sdpa_step(case: DecodeCase, inputs: DecodeInputs) -> Callable[[], torch.Tensor]:
    """A static-cache server's decode step on a dense cache: the new tokens written with index_copy_ at the cache
    positions that follow cache_seqlens (the same for every sequence in the host suite), then SDPA over the
    cache (PyTorch's backend choice)."""
    import torch.nn.functional as F
    if inputs.k_new is None:
        return sdpa(inputs)
    q, k, v = _dense(inputs)
    start = case.cache_len - case.seqlen_new
    positions = torch.arange(start, case.cache_len, device=q.device)
    k_new, v_new = inputs.k_new.transpose(1, 2), inputs.v_new.transpose(1, 2)    # (B, Hkv, seqlen_new, D)

    def run():
        k.index_copy_(2, positions, k_new)
        v.index_copy_(2, positions, v_new)
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    return run


@lru_cache(maxsize=None)
def compiled_flex():
    """flex_attention compiled once for the whole run, static shapes: dynamo keeps one kernel per input shape, which
    the three layouts of a shape and the graph suite reuse (the limit raised so that no shape of the run falls back
    to eager flex_attention)."""
    from torch.nn.attention.flex_attention import flex_attention
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, FLEX_RECOMPILE_LIMIT)
    return torch.compile(flex_attention, dynamic=False)


def flex(case: DecodeCase, inputs: DecodeInputs) -> Callable[[], torch.Tensor]:
    """FlexAttention (enable_gqa) on the dense copy; a ragged batch masks the keys past each sequence's length with a
    block mask built here, outside timing (blocks wholly past a length are skipped, not read)."""
    from torch.nn.attention.flex_attention import create_block_mask
    q, k, v = _dense(inputs)
    mask = None
    if case.seqlens:
        lengths = inputs.seqlens_k

        def within(b, h, q_idx, kv_idx):
            return kv_idx < lengths[b]
        mask = create_block_mask(within, case.batch, None, 1, case.cache_len, device=q.device)
    compiled = compiled_flex()
    return lambda: compiled(q, k, v, block_mask=mask, enable_gqa=True)


def flashinfer_pages(case: DecodeCase, inputs: DecodeInputs) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor]:
    """(k pages, v pages (num_pages, page_size, Hkv, D), page_size, page table (B, pages per sequence) int32 on
    the CPU): the paged cache as it is, or a contiguous cache viewed as pages (no copy) of FLASHINFER_PAGE tokens,
    or of one sequence's capacity from FLASHINFER_WHOLE_BATCH sequences on."""
    if inputs.block_table is not None:
        return inputs.k_cache, inputs.v_cache, case.page_size, inputs.block_table.cpu()
    page = case.capacity if case.batch >= FLASHINFER_WHOLE_BATCH else FLASHINFER_PAGE
    per_sequence = case.capacity // page
    table = torch.arange(case.batch * per_sequence, dtype=torch.int32).view(case.batch, per_sequence)
    pages = [c.view(-1, page, case.heads_kv, case.head_dim) for c in (inputs.k_cache, inputs.v_cache)]
    return pages[0], pages[1], page, table


def flashinfer_decode(case: DecodeCase, inputs: DecodeInputs, graph: bool) -> Callable[[], torch.Tensor]:
    """FlashInfer's paged decode (tensor-core path, NHD), planned here; `graph`: the wrapper made for CUDA-graph
    capture (fixed page-list buffers)."""
    flashinfer = import_flashinfer()     # (JIT off: a module missing from the prebuilt set is n/a, not minutes)
    k_pages, v_pages, page, table = flashinfer_pages(case, inputs)
    device = inputs.q.device
    indptr, indices, last = (t.to(device) for t in flashinfer_csr(table, case.lengths(), page))
    workspace = flashinfer_workspace(device)
    buffers = {}
    if graph:
        buffers = dict(paged_kv_indptr_buffer=indptr.clone(), paged_kv_indices_buffer=indices.clone(),
                       paged_kv_last_page_len_buffer=last.clone())
    wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace, "NHD", use_cuda_graph=graph,
                                                            use_tensor_cores=True, **buffers)
    dtype = TORCH_DTYPES[case.dtype]
    wrapper.plan(indptr, indices, last, case.heads_q, case.heads_kv, case.head_dim, page,
                 q_data_type=dtype, kv_data_type=dtype)
    q = inputs.q.view(case.batch, case.heads_q, case.head_dim)
    return lambda: wrapper.run(q, (k_pages, v_pages))


def fa4(case: DecodeCase, inputs: DecodeInputs) -> Callable[[], Any]:
    """flash-attn 4: flash_attn_func on a full contiguous cache, else flash_attn_varlen_func with seqused_k (and
    page_table for a paged cache). num_splits=1: FA4 has no split-KV on sm90."""
    from flash_attn.cute import flash_attn_func, flash_attn_varlen_func
    q, k_cache, v_cache = inputs.q, inputs.k_cache, inputs.v_cache
    if inputs.block_table is None and not case.seqlens and case.capacity == case.cache_len:
        return lambda: flash_attn_func(q, k_cache, v_cache, num_splits=1)
    seqused, table = inputs.seqlens_k, inputs.block_table
    return lambda: flash_attn_varlen_func(q, k_cache, v_cache, seqused_k=seqused, page_table=table, num_splits=1)


# ---------------------------------------------------------------------------------------------- CUDA graphs

@lru_cache(maxsize=None)
def capture_stream() -> torch.cuda.Stream:
    """The side stream every capture (and its warm-up) runs on."""
    return torch.cuda.Stream()


def graphed(fn: Callable[[], Any]) -> Callable[[], Any]:
    """fn captured in a CUDA graph after one eager call on the capture stream (compiles, plans, allocations and the
    libraries' per-stream state happen outside capture); the result replays the graph on the current stream and
    returns the output the capture produced (refreshed by each replay)."""
    stream = capture_stream()
    stream.wait_stream(torch.cuda.current_stream())     # the inputs and any plan()'s copies are ready
    with torch.cuda.stream(stream):
        fn()
    stream.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        out = fn()

    def replay():
        graph.replay()
        return out
    return replay


# ---------------------------------------------------------------------------------------------- suites

MATRIX_NOTES = (
    f"bf16, Hq {HEADS_Q} / Hkv {HEADS_KV}, D {HEAD_DIM}, one query token; GB/s of the K+V bytes each sequence attends "
    "(sum of seqlen_k * Hkv * D * 2 * 2 B). Ragged: 64 sequences, cache lengths uniform in "
    f"{RAGGED_MIN}..{RAGGED_MAX} (seed {RAGGED_SEED}). SDPA (cuDNN, flash) and Flex read a dense (B, Hkv, S_max, D) "
    "copy: a ragged batch padded to its longest sequence (SDPA unmasked, Flex with a length block mask). FlashInfer: "
    "paged decode, tensor cores, its pages = the blocks (contiguous cache: pages of "
    f"{FLASHINFER_PAGE}, or one per sequence from B={FLASHINFER_WHOLE_BATCH}). FA4: num_splits=1 (sm90). FC/best: "
    "over the fastest peer; tuned/default: dispatch's config over the heuristic default.")
CHECK_NOTE = "check: FlashCore's output against the float64 reference (first and last sequences)."


class Decode(Suite):
    """The decode matrix, eager: every impl's call issued as a user issues it."""
    name = "decode"
    title = "Decode (flash_attn_with_kvcache), eager"
    unit = "GB/s"
    # a decode step finds L2 clean (the projections before it read weights); do_bench's dirty L2 adds a write-back
    # to every impl's call, 8.5-9.3 us at batch 1, 32k (tools/bench_suite.py)
    flush = "read"
    labels = LABELS
    variants = ("default",)
    ratios = {"best": "FC/best", "cudnn": "FC/cuDNN", "flashinfer": "FC/FlashInfer", "default": "tuned/default"}
    graph = False

    @property
    def notes(self) -> str:
        return f"{MATRIX_NOTES} {value_checks_note()} {CHECK_NOTE}"

    def add_arguments(self, group) -> None:
        group.add_argument("--decode-batches", help=f"comma list (default {','.join(map(str, BATCHES))})")
        group.add_argument("--decode-caches", help=f"comma list of tokens per sequence (default "
                           f"{','.join(map(str, CACHES))})")
        group.add_argument("--decode-layouts", help=f"comma list of {', '.join(LAYOUTS)} (default all)")
        group.add_argument("--decode-ragged", action=argparse.BooleanOptionalAction, default=True,
                           help=f"the ragged batch ({RAGGED_BATCH} sequences, {RAGGED_MIN}..{RAGGED_MAX}) per layout")
        group.add_argument("--decode-peers", default=",".join(PEERS), help="comma list of " + ", ".join(PEERS) +
                           " (default all; one not installed is n/a); 'none' times FlashCore alone")
        group.add_argument("--decode-default", action=argparse.BooleanOptionalAction, default=True,
                           help="also time FlashCore's heuristic default config (the tuned/default column)")
        group.add_argument("--decode-mem-gib", type=float, default=MEM_GIB,
                           help=f"leave out points whose cache + dense copy exceed this (default {MEM_GIB:g})")
        group.add_argument("--decode-quick", action="store_true", help="smoke subset: B 1,16, cache 8192, "
                           "contiguous and paged16, the ragged batch")

    def cases(self, args) -> list[Case]:
        chosen = {key: getattr(args, key) or (QUICK[key] if args.decode_quick else None) for key in QUICK}
        batches = _int_list(chosen["decode_batches"], "--decode-batches") if chosen["decode_batches"] else BATCHES
        caches = _int_list(chosen["decode_caches"], "--decode-caches") if chosen["decode_caches"] else CACHES
        layouts = chosen["decode_layouts"].split(",") if chosen["decode_layouts"] else list(LAYOUTS)
        unknown = [x for x in layouts if x not in LAYOUTS]
        if unknown:
            raise ValueError(f"--decode-layouts: unknown {', '.join(unknown)}; known: {', '.join(LAYOUTS)}")
        dense = any(p in DENSE_PEERS for p in self.impls(args))
        kept, left_out = build_matrix(batches, caches, layouts, args.decode_ragged, args.decode_mem_gib, dense)
        for case in left_out:
            print(f"{self.name}: left out B={case.batch} cache={case.cache_len} {case.layout()}: "
                  f"{(case.cache_bytes() + case.dense_bytes() * dense) / 2 ** 30:.1f} GiB > "
                  f"--decode-mem-gib {args.decode_mem_gib:g}", flush=True)
        return [case_of(case) for case in kept]

    @staticmethod
    def _peers(text: str, option: str) -> list[str]:
        peers = [] if text == "none" else [x for x in text.split(",") if x]
        unknown = [x for x in peers if x not in PEERS]
        if unknown:
            raise ValueError(f"{option}: unknown {', '.join(unknown)}; known: {', '.join(PEERS)}")
        return peers

    def impls(self, args) -> list[str]:
        return ["flashcore", *(["default"] if args.decode_default else []),
                *self._peers(args.decode_peers, "--decode-peers")]

    def setup(self, case: Case, impls: list[str]) -> Prepared:
        call = case.call
        inputs = make_inputs(call, "cuda", dense=any(p in impls for p in DENSE_PEERS))
        builders = {"flashcore": lambda: flashcore_call(inputs), "default": lambda: flashcore_default(inputs),
                    "flex": lambda: flex(call, inputs), "fa4": lambda: fa4(call, inputs),
                    "flashinfer": lambda: flashinfer_decode(call, inputs, self.graph),
                    **{b: (lambda b=b: sdpa(inputs, b)) for b in SDPA_BACKENDS}}
        wrap = graphed if self.graph else (lambda fn: fn)
        fns = {name: or_failing(lambda name=name: wrap(builders[name]())) for name in impls}
        return Prepared(fns, check=lambda: check_against_reference(call, inputs, fns["flashcore"]))

    def versions(self) -> dict[str, str]:
        return peer_versions()

    def setup_seconds(self, impls: list[str]) -> float:
        # inputs (up to 16 GiB of randn and copies), the check's float64 reference, FlashInfer's plan; first
        # compiles (Flex per shape, FA4 per variant, FlashCore per layout) spread over the cases
        return 0.6 + 0.6 * ("flex" in impls) + 0.3 * ("fa4" in impls) + 0.05 * self.graph * len(impls)


class DecodeGraph(Decode):
    """The decode matrix as CUDA-graph replays: the kernels' own time, no host cost."""
    name = "decode-graph"
    title = "Decode (flash_attn_with_kvcache), CUDA-graph replay"
    graph = True

    @property
    def notes(self) -> str:
        return (f"{MATRIX_NOTES} Each impl's call captured once in a CUDA graph (after an eager warm-up call) and "
                f"timed as graph replays; FC/best compares replay with replay (n/a: cannot be captured). {CHECK_NOTE}")

    def add_arguments(self, group) -> None:
        """Its peers only; the cases come from the decode suite's options (one parser for every suite)."""
        group.add_argument("--decode-graph-peers", default=",".join(GRAPH_PEERS),
                           help=f"comma list of {', '.join(PEERS)} (default {','.join(GRAPH_PEERS)}: capturing "
                           "FlashInfer's or Flex's call crashed the process on an H100, 2026-11-25)")

    def impls(self, args) -> list[str]:
        return ["flashcore", *(["default"] if args.decode_default else []),
                *self._peers(args.decode_graph_peers, "--decode-graph-peers")]


class DecodeHost(Suite):
    """Host cost of one eager decode call."""
    name = "decode-host"
    title = "Host overhead of one eager decode call"
    timing = "host"
    labels = LABELS
    ratios = {"sdpa": "FC/SDPA host"}

    @property
    def notes(self) -> str:
        return (f"Hq {HEADS_Q} / Hkv {HEADS_KV}, D {HEAD_DIM}, bf16, one query token, cache {HOST_CACHE} per sequence "
                "(with append: the call writes the last slot, then attends all of them). FlashCore: "
                f"flash_attn_with_kvcache (cache_seqlens, block_table, k/v). {value_checks_note()} SDPA: "
                "F.scaled_dot_product_attention (PyTorch's backend choice, enable_gqa) on a dense (B, Hkv, S, D) "
                "cache, the new token written first with index_copy_ on K and V. Floor: FC/SDPA host <= 1.5. check: "
                "FlashCore's output against the float64 reference (the appended token included).")

    def cases(self, args) -> list[Case]:
        return [case_of(case) for case in host_cases()]

    def impls(self, args) -> list[str]:
        return ["flashcore", "sdpa"]

    def setup(self, case: Case, impls: list[str]) -> Prepared:
        call = case.call
        inputs = make_inputs(call, "cuda", dense=True)
        builders = {"flashcore": lambda: flashcore_call(inputs), "sdpa": lambda: sdpa_step(call, inputs)}
        fns = {name: or_failing(builders[name]) for name in impls}
        return Prepared(fns, check=lambda: check_against_reference(call, inputs, fns["flashcore"]))

    def setup_seconds(self, impls: list[str]) -> float:
        return 1.0


SUITES = [DecodeHost(), Decode(), DecodeGraph()]      # the short host suite first: a run cut short still has it
