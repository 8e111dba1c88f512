"""Host side of flash_attn_with_kvcache: value checks, in-place append, split-KV decode, combine.

Kernels of the op (templates/<name>.py.jinja), in launch order:
    kv_check             the call's value checks, read by the host before anything is written (strict mode only;
                         otherwise kv_append and attn_decode check what they use: macros/value_checks.jinja)
    kv_append            new k / v into the cache in place, with rotary on k (and on q, into a copy)
    attn_decode          split-KV attention of the query rows of each kv head over the cache; with several
                         splits in a large batch, the last split of each (sequence, kv head) merges them
    attn_decode_combine  merges the splits of the other split calls (merge_inline says which); on sm90 a
                         programmatic dependent launch (device.programmatic_launch): its grid starts while the
                         decode's drains and waits for it before reading, so its launch and prologue overlap the
                         decode's tail
All four render from the op's spec; rotary is a launch-time option of the append (not a feature), so the decode
spec and its tuning records do not multiply by rotary variants. A spec's version hashes the source of all four.

The eager hot path: the call's signature (shapes, strides, dtypes, pointer alignment, options) -> a `DecodePlan`
of kept launch plans; a call is one dict lookup, a read of the host-memory failure report, the output allocation
(the split partials go to a scratch kept per stream and thread: split_scratch) and 1 to 3 launches; the append
and the decode check the values they use (no device sync unless $FLASHCORE_KV_CHECKS=strict, which adds kv_check
and one sync).
"""
from __future__ import annotations

import inspect
import threading
from dataclasses import dataclass
from functools import lru_cache

import torch
import triton

from ... import dispatch, profiler
from ...counts import nbytes, visible_keys
from ...device import MAX_GRID_YZ, arch, arch_class, programmatic_launch, regs_limit, smem_limit
from ...dtypes import DTYPE_NAMES, ELEM_BYTES
from ...generator import KernelSpec, load
from ...launch import KeptPlans, Step, launched_step, signature
from ...value_errors import (REPORTED, Reporter, checks_at_the_call, describe_failure, raise_pending, reporter,
                             value_check_mode)
from ..attn_fwd.host import score_args
from ..base import Config, next_pow2
from .call import AttnDecodeCall

OP_NAME = "attn_decode"

# Heuristic defaults by arch class: (BLOCK_N, num_warps, num_stages). num_splits 0 = split_heuristic.
DEFAULT_TILES = {"sm90": (64, 4, 3), "sm80": (64, 4, 2), "cpu": (16, 4, 1)}
MIN_SPLIT_KEYS = 128       # the heuristic never gives a split fewer keys than this
LONG_SPLIT_KEYS = 8192     # keys per split once the batch fills half the SMs (one split up to this)
MAX_SPLITS = 128
MERGE_TILE_WORDS = 64      # fp32 registers per thread that the inline merge's [splits, rows, D] tile may take
COMBINE_D = 32             # head-dim columns per combine program (batch 1, H200: D 128 over 4 programs, loads
                           # issued together, merged 0.2-0.9 us sooner than one program per row, loads in turn)
TABLE_ENTRIES = 256        # block-table entries a paged decode program loads at once (host.table_chunk)


def block_m(seqlen_q: int, gqa_group: int) -> int:
    """Query rows of one program: every query token of the kv head's group, at least 16 (the tensor-core dot)."""
    return max(16, next_pow2(seqlen_q * gqa_group))


def table_chunk(page_size: int, block_n: int) -> tuple[int, int]:
    """(TABLE_CHUNK, CHUNK_KEYS) of a paged decode program: the block-table entries it holds in registers at a time,
    TABLE_ENTRIES (2 registers per thread at 4 warps) or one key tile's pages plus one where that is more; and the
    keys it sweeps per chunk of them, whole key tiles whose pages fit (a chunk may start inside a page): 4032 keys
    of blocks of 16 at 64-key tiles, the whole of most splits."""
    entries = max(TABLE_ENTRIES, next_pow2(block_n // page_size + 1))
    return entries, (entries - 1) * page_size // block_n * block_n


def default_config(spec: KernelSpec) -> Config:
    block_n, num_warps, num_stages = DEFAULT_TILES[arch_class(spec["arch"])]
    return {"BLOCK_N": block_n, "num_warps": num_warps, "num_stages": num_stages, "num_splits": 0,
            "combine.num_warps": 2 if spec["arch"] else 1}


def is_feasible(spec: KernelSpec, config: Config, bucket: tuple[int, ...] | None = None) -> str | None:
    """None if `config` runs `spec` (on shapes of `bucket`: batch * heads_kv, cache_len, seqlen_q), else why not."""
    block_n, num_warps = config["BLOCK_N"], config["num_warps"]
    seqlen_q = 1
    if bucket is not None:
        _, cache_len, seqlen_q = bucket
        if block_n > max(16, cache_len):
            return f"BLOCK_N={block_n} > cache bucket {cache_len}"
        if config["num_splits"] > max(1, cache_len // block_n):
            return f"num_splits={config['num_splits']} leaves splits without a key block (cache {cache_len})"
    cc = spec["arch"]
    if cc == 0:
        return None
    rows, block_d = block_m(seqlen_q, spec["gqa_group"]), next_pow2(spec["head_dim"])
    smem = (2 * block_n * max(config["num_stages"], 1) + rows) * block_d * ELEM_BYTES[spec["dtype"]]
    limit = smem_limit(cc)
    if smem > limit:
        return f"shared memory {smem // 1024} KB > {limit // 1024} KB"
    words = rows * block_d + 1.5 * rows * block_n + block_n * block_d   # acc, scores, one K/V tile in flight
    regs = words / (num_warps * 32)
    if regs > regs_limit(num_warps):
        return f"~{regs:.0f} registers per thread > {regs_limit(num_warps)} ({num_warps} warps)"
    return None


def spec_of(call: AttnDecodeCall, cc: int) -> KernelSpec:
    # causal masks nothing for a single query token without a window (it sees every key): one spec for both
    causal = call.causal and (call.seqlen_q > 1 or call.window)
    return KernelSpec.make(OP_NAME, arch=int(cc), dtype=call.dtype, head_dim=int(call.head_dim),
                           gqa_group=int(call.gqa_group), page_size=int(call.page_size), causal=bool(causal),
                           window=bool(call.window), softcap=bool(call.softcap), alibi=bool(call.alibi))


@lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def sms_of(device: torch.device) -> int:
    """Streaming multiprocessors the split heuristic counts for calls on `device`: the GPU's, or 4 off a GPU (the
    interpreter), so that interpreted calls still split."""
    return _sm_count(device.index or 0) if device.type == "cuda" else 4


def split_heuristic(batch_heads: int, capacity: int, sms: int) -> int:
    """Splits per (sequence, kv head) when neither the caller nor the tuned config sets them.

    Small batches: about four programs per SM, but no split under MIN_SPLIT_KEYS keys (on an H100, bf16 D 128: 64
    splits at batch 1 with an 8k cache read 2.6 TB/s, 32 splits 2.5). From half a wave of (sequence, kv head)
    pairs on, one split per LONG_SPLIT_KEYS keys of capacity (one split up to 8k, at most 16): long caches keep
    several programs per SM and a ragged batch's longest sequences do not leave the GPU to a few programs (batch 16
    at 128k through a paged cache read 1.1 TB/s unsplit)."""
    if 2 * batch_heads >= sms:
        return max(1, min(capacity // LONG_SPLIT_KEYS, 16))
    return max(1, min(triton.cdiv(4 * sms, batch_heads), capacity // MIN_SPLIT_KEYS, MAX_SPLITS))


def merge_inline(splits: int, rows: int, head_dim: int, num_warps: int, batch_heads: int, sms: int) -> bool:
    """Whether the last split of each (sequence, kv head) merges the partials (one launch) rather than the combine
    kernel (a second launch: about 6 us of host time per eager call on a lent H200 host).

    The merging program works after its pair's slowest split, on the call's critical path, so it only pays where
    other programs still fill the GPU meanwhile: from half a wave of (sequence, kv head) pairs on. At batch 1 (H200,
    2026-12-04, 16 splits, graph replays) it took 4-9% longer than the combine kernel, whose launch a graph hides.
    Its [splits, rows, D] fp32 tile must also fit MERGE_TILE_WORDS registers per thread."""
    tile = next_pow2(splits) * next_pow2(rows) * next_pow2(head_dim)
    return splits > 1 and 2 * batch_heads >= sms and tile <= MERGE_TILE_WORDS * 32 * num_warps


def paged_chunks(page_size: int, block_n: int, split_len: int) -> dict[str, int | bool]:
    """The paged decode's chunk constexprs for splits of `split_len` keys (CHUNKED: more than one chunk)."""
    entries, chunk_keys = table_chunk(page_size, block_n)
    return {"TABLE_CHUNK": entries, "CHUNK_KEYS": chunk_keys, "CHUNKED": split_len > chunk_keys}


# what a record's num_splits=0 stands for, where its splits merge, and the tiles the host picks around the tuned
# ones (the combine's head-dim slice, the paged decode's table chunk): part of the op's version (OP.host_policy),
# so any edit of these, docstrings included, stales the decode records until a retune
HOST_POLICY = (f"{MIN_SPLIT_KEYS} {LONG_SPLIT_KEYS} {MAX_SPLITS} {MERGE_TILE_WORDS} {COMBINE_D} {TABLE_ENTRIES}\n"
               f"{inspect.getsource(split_heuristic)}{inspect.getsource(merge_inline)}{inspect.getsource(table_chunk)}"
               f"{inspect.getsource(paged_chunks)}")


def splits_for(num_splits: int, config: Config, batch_heads: int, capacity: int, sms: int) -> tuple[int, int]:
    """(splits, keys per split) of a call: the caller's num_splits, else the config's, else the heuristic;
    a multiple of BLOCK_N keys per split, and no split left empty by the rounding."""
    block_n = config["BLOCK_N"]
    splits = num_splits or config["num_splits"] or split_heuristic(batch_heads, capacity, sms)
    splits = max(1, min(splits, MAX_SPLITS, triton.cdiv(capacity, block_n)))
    split_len = triton.cdiv(triton.cdiv(capacity, splits), block_n) * block_n
    return triton.cdiv(capacity, split_len), split_len


def split_merge(num_splits: int, config: Config, batch_heads: int, capacity: int, rows: int, head_dim: int,
                sms: int) -> tuple[int, int, bool, bool]:
    """(splits, keys per split, merged inline, merged by the combine kernel) of a call: what it launches."""
    splits, split_len = splits_for(num_splits, config, batch_heads, capacity, sms)
    inline = merge_inline(splits, rows, head_dim, config["num_warps"], batch_heads, sms)
    return splits, split_len, inline, splits > 1 and not inline




# the call's tensors in the order kept plans read them: the API's tensor arguments, then what a call allocates
INPUTS = ("q", "k_cache", "v_cache", "k_new", "v_new", "cos", "sin", "seqlens", "batch_idx", "leftpad",
          "block_table", "alibi")
# q_rot: the rotated copy of q (q itself without rotary); partial, counters: the split scratch (split_scratch)
SLOTS = INPUTS + ("out", "lse", "partial", "counters", "q_rot")
_SLOT = {name: i for i, name in enumerate(SLOTS)}


def _step(kernel, grid, bind: dict[str, str], tensors: dict, **scalars) -> Step:
    """launched_step with the kernel's tensor parameters bound to slots by name (parameter p is tensors[bind[p]];
    `tensors` by slot name, every slot filled)."""
    return launched_step(kernel, grid, {param: _SLOT[slot] for param, slot in bind.items()},
                         [tensors[slot] for slot in SLOTS], **scalars)


@dataclass(eq=False)            # (hashed by identity: value_errors keeps them in a WeakSet)
class DecodePlan:
    """The kept launches of one call signature, and what a call allocates for them."""
    check: Step | None           # kv_check: built on the first strict call
    check_args: tuple            # (spec, scalars) to build it (kv_check is loaded at its first use)
    errors: torch.Tensor         # (B, 4) int32: kv_check's rows; the append's codes (column 0), which the decode reads
    reporter: Reporter | None    # the device's failure report, read before each call; None: checks off
    strict: bool                 # kv_check and a sync before each eager call ($FLASHCORE_KV_CHECKS=strict; on the
                                 # CPU, where the values are the host's, by default)
    lse_shape: tuple | None      # (B, Hq, Sq) with return_lse
    device: torch.device         # q's
    append: Step | None = None
    decode: Step | None = None
    combine: Step | None = None
    partial_numel: int = 0       # fp32 elements of the split partials (0: one split, no merge)
    counters: int = 0            # merge tickets, one per (sequence, kv head) (0: no inline merge)
    rotary: bool = False         # the append writes a rotated copy of q, which the decode reads
    captured: bool = False       # built under CUDA-graph capture (never kept), or a kept plan a graph captured
                                 # (its error rows are then in _captured_errors)
    function = "flash_attn_with_kvcache"   # (for a deferred failure's message: value_errors.py)
    description: str = ""        # the call's shapes, for a deferred failure's message
    reported: frozenset = frozenset()   # the scalars its kernels report a failure with (value_errors.REPORTED)
    last_call: int = 0           # its last call's number among the device's KV-cache calls since the last report

    def reports_as(self, b: int, scalars: tuple) -> bool:
        """Whether a failure of sequence b reported with `scalars` may be one of this signature's."""
        return b < len(self.errors) and scalars in self.reported

    def allocate(self, inputs: tuple, stream, capturing: bool) -> tuple:
        """The call's tensors, SLOTS order: `inputs` (INPUTS order) + out, lse, partial and counters (the scratch of
        `stream`, or the graph's own while `capturing`), q_rot."""
        q = inputs[0]
        device = self.device
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
        lse = None if self.lse_shape is None else torch.empty(self.lse_shape, dtype=torch.float32, device=device)
        partial, counters = (split_scratch(self.partial_numel, self.counters, device, stream, capturing)
                             if self.partial_numel else (None, None))
        q_rot = torch.empty_like(q, memory_format=torch.contiguous_format) if self.rotary else q
        return (*inputs, out, lse, partial, counters, q_rot)

    def run(self, inputs: tuple) -> tuple:
        """One call of the signature: (out, lse); lse is None unless the call returns it."""
        reporter = self.reporter
        if reporter is not None:
            if reporter.view[0]:
                raise_pending(self.device)
            reporter.count(self)
        stream = self.decode.plan.current_stream()      # (read once: the launches of a call share it)
        capturing = self.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        if capturing and not self.captured:
            self.captured = True
            _captured_errors.append(self.errors)
        call = self.allocate(inputs, stream, capturing)
        if self.strict and not capturing:
            _check_values(self, call, stream)
        if self.append is not None:
            self.append(call, stream)
        self.decode(call, stream)
        if self.combine is not None:
            self.combine(call, stream)
        return call[_SLOT["out"]], call[_SLOT["lse"]]


# (device, stream, thread) -> the split scratch of that thread's eager calls on that stream: (partials, counters)
_scratch: dict[tuple, tuple] = {}
dispatch.on_clear(_scratch.clear)


def split_scratch(numel: int, counters: int, device: torch.device, stream, capturing: bool) -> tuple:
    """(fp32 room for `numel` split partials (out and lse of every split), int32 room for `counters` merge tickets
    that are 0 between calls (None for no counters)) for a call about to launch on `stream` (a handle; None: the
    current stream), `capturing` a CUDA graph or not. A call that merges inline leaves its tickets at 0 again (the
    merging split resets them).

    An allocation costs an eager call about as much as a launch (4 us on a lent H200 host), so eager calls reuse
    one scratch per (device, stream, thread), grown when a call needs more. That is safe because the calls of one
    thread on one stream run in order: a call's merge has read its partials before the next call's decode
    overwrites them. Another stream or thread has its own scratch (two threads on one stream could interleave one
    call's decode with another's combine), and a buffer given up on growing goes back to the caching allocator on
    its stream. Under CUDA-graph capture the graph must own the memory it replays on: a fresh allocation from the
    graph's pool. The scratch (one per stream and thread that decoded) is kept until `dispatch.clear()`."""
    if device.type == "cuda":
        if capturing:
            return (torch.empty(numel, dtype=torch.float32, device=device),
                    torch.zeros(counters, dtype=torch.int32, device=device) if counters else None)
        if stream is None:          # launches through Triton's own path: they go to torch's current stream
            stream = torch.cuda.current_stream(device).cuda_stream
    key = (device, stream, threading.get_ident())
    partial, tickets = _scratch.get(key, (None, None))
    if partial is None or partial.numel() < numel:
        partial = torch.empty(numel, dtype=torch.float32, device=device)
        _scratch[key] = (partial, tickets)
    if counters and (tickets is None or tickets.numel() < counters):
        tickets = torch.zeros(counters, dtype=torch.int32, device=device)
        _scratch[key] = (partial, tickets)
    return partial, tickets if counters else None


# signature of a call (launch.signature of its INPUTS and options: all that the plans depend on and the API's
# checks read, so a kept plan vouches for the checks of its exact signature) -> its DecodePlan; forgotten when
# dispatch's configs change or the check mode is read again (dispatch.clear)
_plans = KeptPlans()
# the error rows of every plan a CUDA graph captured, kept for the process's life: the graph's kernels read and
# write them on each replay, also after dispatch.clear() or a full KeptPlans forgets the plan (one (B, 4) int32
# tensor per captured signature)
_captured_errors: list[torch.Tensor] = []


def kept_plan(key: tuple | None) -> DecodePlan | None:
    """The plan of a signature seen before (its checks passed), else None."""
    try:
        return _plans.get(key)
    except TypeError:       # an unhashable option: the checks say whether it is valid
        return None


def decode_attention(q, k_cache, v_cache, k_new, v_new, cos, sin, cache_seqlens, cache_seqlen: int,
                     cache_batch_idx, cache_leftpad, block_table, softmax_scale: float, causal: bool,
                     window_left: int, window_right: int, softcap: float, rotary_interleaved: bool,
                     alibi_slopes, num_splits: int, return_lse: bool, config: Config | None = None,
                     validate=None, key: tuple | None = None):
    """Checked inputs in, (out, lse) out; lse is None unless `return_lse`. Appends k_new / v_new in place.

    cache_seqlens: (B,) int32 tensor, or None with the int `cache_seqlen` for every sequence (the whole capacity
    when the caller gave neither). window_left / window_right: -1 when unbounded, causal folded in (right = 0).
    `validate()` runs once per new signature, before anything launches (the API's shape checks). `config`
    overrides dispatch (the tuner and tests use it). `key`: the plan's key, when the caller made it (the API keys
    plans by its own arguments); else the signature of these. Values are checked as `value_check_mode()` says.
    """
    if profiler.ACTIVE is not None:        # inside flashcore.profile(): timed and described
        return profiler.ACTIVE.measure(decode_attention, locals(), profiled)
    inputs = (q, k_cache, v_cache, k_new, v_new, cos, sin, cache_seqlens, cache_batch_idx, cache_leftpad,
              block_table, alibi_slopes)
    if key is None:
        key = signature(inputs, ("host", cache_seqlen, softmax_scale, causal, window_left, window_right, softcap,
                                 rotary_interleaved, num_splits, return_lse,
                                 None if config is None else tuple(config.items())))
    plan = kept_plan(key)
    if plan is not None:
        return plan.run(inputs)
    if validate is not None:
        validate()
    if key is None:         # not tensors where tensors belong, and no checks to name them
        raise TypeError("decode_attention: q, k_cache, v_cache and the optional tensors must be torch.Tensors")
    mode = value_check_mode()
    plan = DecodePlan(None, None, None, None if mode == "off" else reporter(q.device),
                      checks_at_the_call(mode, q.device),
                      (q.shape[0], q.shape[2], q.shape[1]) if return_lse else None, q.device)
    plan.captured = q.is_cuda and torch.cuda.is_current_stream_capturing()
    call = _build(plan, inputs, cache_seqlen, softmax_scale, causal, window_left, window_right, softcap,
                  rotary_interleaved, num_splits, config)
    # kept only once every step launched (a raising check stores nothing), and not when built under capture: its
    # error rows come from the graph's pool, which eager calls must not use after the graph is gone
    if not plan.captured:
        _plans.put(key, plan)
    return call[_SLOT["out"]], call[_SLOT["lse"]]


def profiled(q, k_cache, v_cache, k_new, v_new, cos, sin, cache_seqlens, cache_seqlen, cache_batch_idx, cache_leftpad,
             block_table, softmax_scale, causal, window_left, window_right, softcap, rotary_interleaved, alibi_slopes,
             num_splits, return_lse, config=None, validate=None, key=None) -> profiler.Described:
    """What flashcore.profile() records of a decode_attention call (its arguments). Each sequence attends its keys
    after the append, from its leftpad on; the lengths are copied on the device now (no sync) and read when the
    profile closes."""
    batch, seqlen_q, heads_q, head_dim = q.shape
    has_window = window_left >= 0 or (window_right >= 0 and not causal)
    tensors = dict(zip(INPUTS, (q, k_cache, v_cache, k_new, v_new, cos, sin, cache_seqlens, cache_batch_idx,
                                cache_leftpad, block_table, alibi_slopes)))
    call = call_of(tensors, causal, has_window, softcap > 0)
    seqlens = cache_seqlens.clone() if cache_seqlens is not None else None
    leftpad = cache_leftpad.clone() if cache_leftpad is not None else None
    fixed = 2 * nbytes(q) + 2 * nbytes(k_new, v_new) + (4 * batch * heads_q * seqlen_q if return_lse else 0)
    token_bytes = 2 * call.heads_kv * head_dim * k_cache.element_size()

    def counts():
        lengths = seqlens.tolist() if seqlens is not None else [cache_seqlen] * batch
        starts = leftpad.tolist() if leftpad is not None else [0] * batch
        keys = [n + call.seqlen_new - start for n, start in zip(lengths, starts)]
        pairs = sum(visible_keys(seqlen_q, n, causal, (window_left, window_right)) for n in keys)
        return 4.0 * heads_q * head_dim * pairs, fixed + sum(max(n, 0) for n in keys) * token_bytes
    from . import OP
    return profiler.Described(OP_NAME, call.describe(), runtime_spec(call, q), OP.bucket_of(call), config, counts)


def call_of(tensors: dict, causal: bool, window: bool, softcap: bool) -> AttnDecodeCall:
    q, k_cache, block_table, k_new = tensors["q"], tensors["k_cache"], tensors["block_table"], tensors["k_new"]
    batch, seqlen_q, heads_q, head_dim = q.shape
    page_size = k_cache.shape[1] if block_table is not None else 0
    capacity = block_table.shape[1] * page_size if block_table is not None else k_cache.shape[1]
    return AttnDecodeCall(batch, seqlen_q, heads_q, k_cache.shape[2], head_dim, capacity, DTYPE_NAMES[q.dtype],
                          page_size, 0 if k_new is None else k_new.shape[1], causal, window, softcap,
                          tensors["alibi"] is not None)


def runtime_spec(call: AttnDecodeCall, q) -> KernelSpec:
    return spec_of(call, arch(q.device.index or 0) if q.is_cuda else 0)


def _check_values(plan: DecodePlan, call: tuple, stream=None) -> None:
    """kv_check over the call's metadata (SLOTS order) on `stream` (a kept plan's; the first call builds kv_check's
    plan on the current one), then its rows (one device sync): the first failure raises before anything is
    written."""
    spec, scalars = plan.check_args
    device = call[0].device
    if plan.check is None:
        plan.check = _step(load(spec, "kv_check").kv_check, (len(plan.errors),),
                           dict(CacheSeqlens="seqlens", LeftPad="leftpad", CacheBatchIdx="batch_idx",
                                BlockTable="block_table"), dict(zip(SLOTS, call)), Err=plan.errors,
                           Report=reporter(device).tensor, **scalars)
    else:
        plan.check(call, stream)
    failures = [(b, row) for b, row in enumerate(plan.errors.tolist()) if row[0]]
    if failures:
        reporter(device).reset()           # (raised here: not again by the next call)
        plan.errors.zero_()                # (a decode without an append reads zeros, a captured one too)
        b, (code, value, extra, _) = failures[0]
        raise ValueError(describe_failure(code, b, value, extra, *(scalars[name] for name in REPORTED)))


def describe_call(tensors: dict, cache_seqlen: int, causal: bool, window_left: int, window_right: int) -> str:
    """The shapes of a KV-cache call, as a deferred failure's message names it."""
    def shape(name):
        return tuple(tensors[name].shape)
    q = tensors["q"]
    parts = [f"q {shape('q')} {DTYPE_NAMES[q.dtype]}", f"k_cache {shape('k_cache')}"]
    parts += [f"{name} {shape(slot)}" for name, slot in (("k", "k_new"), ("block_table", "block_table"),
                                                         ("cache_batch_idx", "batch_idx"),
                                                         ("cache_leftpad", "leftpad"), ("rotary_cos", "cos"))
              if tensors[slot] is not None]
    parts.append("cache_seqlens tensor" if tensors["seqlens"] is not None else f"cache_seqlens={cache_seqlen}")
    parts += ["causal"] * causal + [f"window_size=({window_left}, {window_right})"] * (window_left >= 0)
    return ", ".join(parts)


def _build(plan: DecodePlan, inputs: tuple, cache_seqlen, softmax_scale, causal, window_left, window_right, softcap,
           rotary_interleaved, num_splits, config) -> tuple:
    """Fills `plan` with the launches of the call `inputs` (INPUTS order), launching each once; returns the call's
    tensors (SLOTS order)."""
    q, k_cache, v_cache = inputs[:3]
    batch, seqlen_q, heads_q, head_dim = q.shape
    heads_kv = k_cache.shape[2]
    if batch > MAX_GRID_YZ or heads_kv > MAX_GRID_YZ:
        raise ValueError(f"q: batch ({batch}) and k_cache's heads ({heads_kv}) must each be at most {MAX_GRID_YZ}")
    if plan.reporter is not None:
        raise_pending(q.device)
        plan.reporter.count(plan)
    tensors = dict(zip(INPUTS, inputs))
    has_window = window_left >= 0 or (window_right >= 0 and not causal)
    call = call_of(tensors, causal, has_window, softcap > 0)
    spec = runtime_spec(call, q)
    capacity = call.cache_len
    block_table, cos, sin = tensors["block_table"], tensors["cos"], tensors["sin"]
    paged = block_table is not None
    q_per_token = causal or has_window
    seqlen_new = call.seqlen_new
    plan.rotary = bool(seqlen_new) and cos is not None
    tensors.update(zip(SLOTS[len(INPUTS):], plan.allocate(inputs, None, plan.captured)[len(INPUTS):]))
    check = plan.reporter is not None
    # the cache's scalar arguments, the same for every kernel of the call
    shared = dict(seqlen_new=seqlen_new, capacity=capacity, num_cache_rows=k_cache.shape[0],
                  cache_seqlen=cache_seqlen, seqlen_ro=-1 if cos is None else cos.shape[0])
    flags = dict(HAS_SEQLENS=tensors["seqlens"] is not None, HAS_LEFTPAD=tensors["leftpad"] is not None,
                 HAS_BATCH_IDX=tensors["batch_idx"] is not None)
    rotary_span = max(seqlen_new, seqlen_q if q_per_token else 1)
    stride_bt = block_table.stride(0) if paged else 0
    if plan.reporter is not None:     # what names this call in a deferred failure's message
        cache = (capacity, seqlen_new, k_cache.shape[0])
        plan.reported = frozenset({(*cache, shared["seqlen_ro"], rotary_span), (*cache, -1, 0)})   # append, decode
        plan.description = describe_call(tensors, cache_seqlen, causal, window_left, window_right)
        plan.reporter.signatures.add(plan)

    # -- strict value checks (before anything is written) --
    plan.check_args = (spec, dict(shared, rotary_span=rotary_span, stride_bt=stride_bt, **flags))
    plan.errors = torch.zeros((batch, 4), dtype=torch.int32, device=q.device)
    if plan.strict and not plan.captured:
        _check_values(plan, tuple(tensors[slot] for slot in SLOTS))
    report = reporter(q.device).tensor  # where the kernels report a failure

    # -- append (and rotary) --
    if seqlen_new:
        k_new, v_new, q_rot = tensors["k_new"], tensors["v_new"], tensors["q_rot"]
        plan.append = _step(
            load(spec, "kv_append").kv_append, (max(seqlen_new, seqlen_q if cos is not None else 0), batch),
            dict(KNew="k_new", VNew="v_new", KCache="k_cache", VCache="v_cache", Q="q", QRot="q_rot",
                 Cos="cos", Sin="sin", CacheSeqlens="seqlens", CacheBatchIdx="batch_idx", LeftPad="leftpad",
                 BlockTable="block_table"),
            tensors, Err=plan.errors, Report=report, rotary_span=rotary_span,
            stride_knb=k_new.stride(0), stride_kns=k_new.stride(1), stride_knh=k_new.stride(2),
            stride_vnb=v_new.stride(0), stride_vns=v_new.stride(1), stride_vnh=v_new.stride(2),
            stride_kb=k_cache.stride(0), stride_ks=k_cache.stride(1), stride_kh=k_cache.stride(2),
            stride_vb=v_cache.stride(0), stride_vs=v_cache.stride(1), stride_vh=v_cache.stride(2),
            stride_qb=q.stride(0), stride_qs=q.stride(1), stride_qh=q.stride(2),
            stride_rb=q_rot.stride(0), stride_rs=q_rot.stride(1), stride_rh=q_rot.stride(2),
            stride_bt=stride_bt, stride_cos=cos.stride(0) if cos is not None else 0,
            stride_sin=sin.stride(0) if cos is not None else 0,
            seqlen_q=seqlen_q, num_heads_kv=heads_kv, num_heads_q=heads_q,
            **shared, **flags, CHECK=check,
            ROTARY_DIM=0 if cos is None else 2 * cos.shape[1], INTERLEAVED=rotary_interleaved,
            Q_PER_TOKEN=q_per_token,
            HEADS_KV=next_pow2(heads_kv), HEADS_Q=next_pow2(heads_q), num_warps=4)

    # -- decode (+ combine) with the config dispatch chose --
    sms = sms_of(q.device)
    if config is not None:
        _decode_steps(plan, spec, config, tensors, shared, softmax_scale, window_left, window_right, softcap,
                      num_splits, sms, check)
    else:
        from . import OP
        dispatch.first_launch(OP, spec, OP.bucket_of(call), lambda config: _decode_steps(
            plan, spec, config, tensors, shared, softmax_scale, window_left, window_right, softcap, num_splits, sms,
            check))
    return tuple(tensors[slot] for slot in SLOTS)


def _decode_steps(plan: DecodePlan, spec: KernelSpec, config: Config, tensors: dict, shared: dict,
                  softmax_scale, window_left, window_right, softcap, num_splits, sms, check: bool) -> None:
    q, k_cache, v_cache, out = tensors["q_rot"], tensors["k_cache"], tensors["v_cache"], tensors["out"]
    batch, seqlen_q, heads_q, head_dim = q.shape
    heads_kv = k_cache.shape[2]
    capacity = shared["capacity"]
    rows = seqlen_q * spec["gqa_group"]
    splits, split_len, inline, combine = split_merge(num_splits, config, batch * heads_kv, capacity, rows, head_dim,
                                                     sms)
    plan.partial_numel = batch * heads_kv * splits * rows * (head_dim + 1) if splits > 1 else 0
    plan.counters = batch * heads_kv if inline else 0
    pdl = combine and programmatic_launch(spec["arch"])
    lse_offset = batch * heads_kv * splits * rows * head_dim       # the partial lse follow the partial outputs
    if splits > 1:
        tensors["partial"], tensors["counters"] = split_scratch(plan.partial_numel, plan.counters, q.device, None,
                                                                plan.captured)
    block_table, alibi = tensors["block_table"], tensors["alibi"]
    alibi_args = {} if alibi is None else dict(stride_alibi_b=alibi.stride(0) if alibi.dim() == 2 else 0)
    plan.decode = _step(
        load(spec, "attn_decode").attn_decode, (splits, heads_kv, batch),
        dict(Q="q_rot", KCache="k_cache", VCache="v_cache", Out="out", Lse="lse", Partial="partial",
             Counters="counters", CacheSeqlens="seqlens", CacheBatchIdx="batch_idx", LeftPad="leftpad",
             BlockTable="block_table",
             **({"Alibi": "alibi"} if alibi is not None else {})),
        tensors, Err=plan.errors, Report=reporter(q.device).tensor, **alibi_args,
        stride_qb=q.stride(0), stride_qs=q.stride(1), stride_qh=q.stride(2),
        stride_kb=k_cache.stride(0), stride_ks=k_cache.stride(1), stride_kh=k_cache.stride(2),
        stride_vb=v_cache.stride(0), stride_vs=v_cache.stride(1), stride_vh=v_cache.stride(2),
        stride_ob=out.stride(0), stride_os=out.stride(1), stride_oh=out.stride(2),
        stride_bt=block_table.stride(0) if block_table is not None else 0,
        seqlen_q=seqlen_q, seqlen_new=shared["seqlen_new"], num_heads_kv=heads_kv, capacity=capacity,
        num_cache_rows=shared["num_cache_rows"], cache_seqlen=shared["cache_seqlen"], split_len=split_len,
        lse_offset=lse_offset,
        **score_args(softmax_scale, softcap, window_left, window_right, capacity + seqlen_q),
        HAS_SEQLENS=tensors["seqlens"] is not None, HAS_BATCH_IDX=tensors["batch_idx"] is not None,
        HAS_LEFTPAD=tensors["leftpad"] is not None, STORE_LSE=tensors["lse"] is not None,
        WRITE_PARTIAL=splits > 1, CHECK=check, PDL=pdl,
        BLOCK_M=block_m(seqlen_q, spec["gqa_group"]), BLOCK_N=config["BLOCK_N"],
        # (the merge's tile only where it merges: the other calls share one compile whatever their split count)
        MERGE_INLINE=inline, SPLITS_POW2=next_pow2(splits) if inline else 1,
        MERGE_ROWS=next_pow2(rows) if inline else 1,
        **(paged_chunks(spec["page_size"], config["BLOCK_N"], split_len) if spec["page_size"] else {}),
        num_warps=config["num_warps"], num_stages=config["num_stages"])
    plan.combine = None
    if combine:
        merge_d = min(COMBINE_D, next_pow2(head_dim))
        plan.combine = _step(
            load(spec, "attn_decode_combine").attn_decode_combine,
            (rows * triton.cdiv(head_dim, merge_d), heads_kv, batch),
            dict(Partial="partial", Out="out", Lse="lse"), tensors,
            stride_ob=out.stride(0), stride_os=out.stride(1), stride_oh=out.stride(2),
            seqlen_q=seqlen_q, num_heads_kv=heads_kv, num_splits=splits, lse_offset=lse_offset,
            STORE_LSE=tensors["lse"] is not None, SPLITS_POW2=next_pow2(splits), MERGE_D=merge_d, PDL=pdl,
            num_warps=config["combine.num_warps"], **({"launch_pdl": True} if pdl else {}))
