"""attn_varlen's suites for flashcore-bench: packed batches of mixed lengths and chunked prefill against a paged
cache, FlashCore's flash_attn_varlen_func against its peers, every implementation in the same run on the same values.

mixed    causal prefill batches whose lengths are drawn uniformly from 64..4096 (seeded: the same batch on every
         machine), 16k and 64k tokens in all; bf16, D 128, Hq 32 / Hkv 8. Then the 16k batch once more in fp16, at
         D 64, at D 256 and with MHA (Hq = Hkv = 32): one row each. Two more 16k batches: `padded`, one 4096-token
         sequence among short ones (64..1024: over 80% of the padded batch is padding), and `uniform`, 8 x 2048
         (no padding: varlen against FlashCore dense at the same shapes).
skewed   one 16k-token sequence followed by 63 of 256 (causal, 32512 tokens), and a row timing the 16k sequence alone:
         the floor compares the two latencies (the 63 short sequences add 1.5% of the work).
chunked  chunked prefill: each sequence appends a chunk of 512 or 2048 new tokens (causal, bottom-right) to a prefix
         of 4k, 16k or 64k tokens already in a paged cache (pages of 16 and 128 tokens, block tables shuffled); the
         keys are prefix + chunk. Six (chunk, prefix, batch) points per page size, batches 1 / 8 / 32;
         --varlen-heavy adds the 64k prefix at batch 32 (18 and 71 TFLOP a call, 9 GiB of cache).

TFLOP/s count useful FLOPs, real tokens only (counts.useful_flops: 4 * Hq * D per (row, key) pair a row attends;
causal exactly), so every implementation's rate is over the same work and a padded peer pays for its padding;
cells also give each call's latency (the whole batch). Implementations, inputs built outside timing:
    flashcore   flashcore.flash_attn_varlen_func (block_table for a paged cache), dispatch's config
    default     FlashCore again with the op's heuristic default config (tuned/default: what tuning buys)
    flashinfer  FlashInfer's BatchPrefillWithRaggedKVCacheWrapper (packed K/V) or BatchPrefillWithPagedKVCacheWrapper
                (the case's pages), NHD, planned once per case. The carried prebuilt modules cover bf16 at head_dim
                128 only: other dtypes and head dims are n/a (JIT compiles take minutes; FLASHINFER_DISABLE_JIT=1)
    fa4         flash-attn 4's flash_attn_varlen_func (flash_attn.cute): cu_seqlens, or seqused_k and page_table
    sdpa        F.scaled_dot_product_attention on the padded batch (B, H, S_max, D) (views of a zero-padded
                (B, S_max, H, D) copy, enable_gqa): cuDNN, flash and efficient each tried and timed briefly in
                setup, the fastest timed (its name is in the check's `sdpa_backend` and the log); causal top-left
                for a square batch, causal_lower_right for chunks
    nested      SDPA on nested (jagged) tensors sharing q's offsets (torch.nested.nested_tensor_from_jagged), fused
                backends only (flash, efficient, cuDNN); K/V heads repeated to Hq outside timing (jagged SDPA takes
                no GQA); self-attention batches only (its causal mask is top-left aligned: not the chunked suite)
    dense       FlashCore's flash_attn_func on the same padded batch (varlen/padded: what packing buys)
A peer that is not installed or cannot run a case is n/a, with its reason in the log and the JSON.

FlashCore's output is checked once per case against the float64 reference (flashcore/reference.py): the first and
last sequences of the batch, a long one on its first and last 64 query rows.

    flashcore-bench --op attn_varlen --list
    flashcore-bench --op attn_varlen --out $OUT --warmup-ms 10 --rep-ms 40     # ~4-5 min on an H200
    flashcore-bench --op attn_varlen --varlen-quick --out $OUT                 # smoke: 6 rows
    flashcore-bench --suite chunked --varlen-heavy --varlen-peers flashinfer,fa4 --out $OUT
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from flashcore.dtypes import TORCH_DTYPES
from flashcore.tools.bench_suite import Case, Prepared, Suite, or_failing, verdict

from ...counts import useful_flops
from ..bench_common import flashinfer_csr, flashinfer_workspace, import_flashinfer, peer_versions, value_checks_note
from .workload import VarlenInputs, draw_lengths, make_inputs, sequence_errors, sequence_keys, sequence_rows

HEADS_Q, HEADS_KV, HEAD_DIM, DTYPE = 32, 8, 128, "bf16"
MIXED_TOKENS = (16384, 65536)
MIXED_LOW, MIXED_HIGH, MIXED_SEED = 64, 4096, 0
# the 16k batch again, one change each: (dtype, head_dim, heads_q, heads_kv)
MIXED_VARIANTS = (("fp16", 128, 32, 8), ("bf16", 64, 32, 8), ("bf16", 256, 32, 8), ("bf16", 128, 32, 32))
PADDED_LONG, PADDED_LOW, PADDED_HIGH = 4096, 64, 1024     # the mostly-padding batch: one long, the rest short
UNIFORM = (8, 2048)                                       # (batch, length) of the uniform batch
SKEWED_LONG, SKEWED_SHORT, SKEWED_COUNT = 16384, 256, 63
# (chunk, prefix, batch) per page size: each chunk against each prefix once, batches 1 / 8 / 32 spread over them
CHUNKED = ((512, 4096, 8), (512, 16384, 32), (512, 65536, 1), (2048, 4096, 32), (2048, 16384, 8), (2048, 65536, 1))
CHUNKED_HEAVY = ((512, 65536, 32), (2048, 65536, 32))
PAGES = (16, 128)
QUICK_CHUNKED = ((512, 16384, 8),)
CHECK_ROWS = 64         # query rows per end of a long sequence checked against the float64 reference
PEERS = ("flashinfer", "fa4", "sdpa", "nested", "dense")
SDPA_BACKENDS = {"cudnn": "CUDNN_ATTENTION", "flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION"}
PROBE_CALLS = 3         # timed calls per SDPA backend when picking the fastest (after one warm-up call)
LABELS = {"flashcore": "FlashCore", "default": "FC-default", "flashinfer": "FlashInfer", "fa4": "FA4",
          "sdpa": "SDPA-padded", "nested": "SDPA-jagged", "dense": "FC-padded"}
FLASHINFER_SKIP = ("skipped: the carried FlashInfer modules are prebuilt for bf16 at head_dim 128 only (another "
                   "case would JIT-compile for minutes)")


# ---------------------------------------------------------------------------------------------- cases

@dataclass(frozen=True)
class VarlenCase:
    """One packed batch: sequence b has seqlens_q[b] query tokens attending seqlens_k[b] keys (bottom-right
    aligned), K/V packed (page_size 0) or in a paged cache of page_size-token blocks."""
    kind: str                           # mixed | skewed | alone | chunked
    seqlens_q: tuple[int, ...]
    seqlens_k: tuple[int, ...]
    heads_q: int = HEADS_Q
    heads_kv: int = HEADS_KV
    head_dim: int = HEAD_DIM
    dtype: str = DTYPE
    page_size: int = 0
    causal: bool = True
    heavy: bool = False                 # long enough to leave out of the default run (--varlen-heavy)

    @property
    def batch(self) -> int:
        return len(self.seqlens_q)

    @property
    def tokens(self) -> int:
        return sum(self.seqlens_q)

    @property
    def flops(self) -> int:
        """Useful FLOPs of one call: real tokens only (counts.useful_flops)."""
        return useful_flops(self.seqlens_q, self.seqlens_k, self.heads_q, self.head_dim, self.causal)

    @property
    def uniform(self) -> bool:
        return len(set(self.seqlens_q)) <= 1 and len(set(self.seqlens_k)) <= 1

    def prefix(self) -> int:
        """A uniform chunked batch's prefix: keys before the chunk."""
        return self.seqlens_k[0] - self.seqlens_q[0]


def _tokens(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def describe_lengths(case: VarlenCase) -> str:
    """'8 x 64..4096', '1x16k + 63x256', '1x16k'."""
    if case.kind in ("skewed", "alone"):
        counts: dict[int, int] = {}
        for n in case.seqlens_q:
            counts[n] = counts.get(n, 0) + 1
        return " + ".join(f"{c}x{_tokens(n)}" for n, c in counts.items())
    return f"{case.batch} x {min(case.seqlens_q)}..{max(case.seqlens_q)}"


def case_of(case: VarlenCase) -> Case:
    """The table row of a case."""
    shape = [("dtype", case.dtype), ("D", str(case.head_dim)), ("H q/kv", f"{case.heads_q}/{case.heads_kv}")]
    heavy = " [heavy]" if case.heavy else ""
    if case.kind == "chunked":
        columns = [("B", str(case.batch)), ("chunk", str(case.seqlens_q[0])), ("prefix", _tokens(case.prefix())),
                   ("page", str(case.page_size))] + shape
        label = (f"B={case.batch:<2} chunk={case.seqlens_q[0]:<4} prefix={_tokens(case.prefix()):>3} "
                 f"page={case.page_size:<3} {case.dtype} D={case.head_dim} H={case.heads_q}/{case.heads_kv}{heavy}")
    else:
        lengths = describe_lengths(case)
        columns = [("batch", lengths), ("tokens", _tokens(case.tokens))] + shape
        label = (f"{case.kind:6} {_tokens(case.tokens):>5} tokens {lengths:14} {case.dtype} D={case.head_dim} "
                 f"H={case.heads_q}/{case.heads_kv}{heavy}")
    return Case(case, tuple(columns), label, work=float(case.flops))


def mixed_lengths(tokens: int) -> tuple[int, ...]:
    """The mixed batch of `tokens` tokens: lengths uniform in 64..4096, the same on every machine and run."""
    return draw_lengths(tokens, MIXED_LOW, MIXED_HIGH, MIXED_SEED)


def mixed_cases(quick: bool = False) -> list[VarlenCase]:
    cases = []
    for tokens in MIXED_TOKENS[:1] if quick else MIXED_TOKENS:
        lengths = mixed_lengths(tokens)
        cases.append(VarlenCase("mixed", lengths, lengths))
    if not quick:
        lengths = mixed_lengths(MIXED_TOKENS[0])
        cases += [VarlenCase("mixed", lengths, lengths, heads_q=hq, heads_kv=hkv, head_dim=d, dtype=dtype)
                  for dtype, d, hq, hkv in MIXED_VARIANTS]
        padded = (PADDED_LONG,) + draw_lengths(MIXED_TOKENS[0] - PADDED_LONG, PADDED_LOW, PADDED_HIGH, MIXED_SEED)
        uniform = (UNIFORM[1],) * UNIFORM[0]
        cases += [VarlenCase("padded", padded, padded), VarlenCase("uniform", uniform, uniform)]
    return cases


def skewed_cases() -> list[VarlenCase]:
    skewed = (SKEWED_LONG,) + (SKEWED_SHORT,) * SKEWED_COUNT
    return [VarlenCase("skewed", skewed, skewed), VarlenCase("alone", (SKEWED_LONG,), (SKEWED_LONG,))]


def chunked_cases(quick: bool = False, heavy: bool = False) -> list[VarlenCase]:
    points = QUICK_CHUNKED if quick else CHUNKED + (CHUNKED_HEAVY if heavy else ())
    return [VarlenCase("chunked", (chunk,) * batch, (prefix + chunk,) * batch, page_size=page,
                       heavy=(chunk, prefix, batch) in CHUNKED_HEAVY)
            for page in PAGES for chunk, prefix, batch in points]


# ---------------------------------------------------------------------------------------------- inputs

def inputs_of(case: VarlenCase, device="cuda") -> VarlenInputs:
    return make_inputs(case.seqlens_q, case.seqlens_k, case.heads_q, case.heads_kv, case.head_dim, case.dtype,
                       case.page_size, device)


def padded_batch(case: VarlenCase, inputs: VarlenInputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q (B, Sq_max, Hq, D), k, v (B, Sk_max, Hkv, D)), contiguous: each sequence at the start of its row, zeros
    after it. Right for a causal self-attention batch (a real row sees only keys before it) and for a uniform
    batch; any other batch would need a per-sequence mask, so it raises."""
    if not (case.uniform or (case.causal and case.seqlens_q == case.seqlens_k)):
        raise RuntimeError("a padded batch of unequal chunks or prefixes needs a per-sequence mask (not built)")
    batch, sq, sk = case.batch, max(case.seqlens_q), max(case.seqlens_k)
    if case.uniform and inputs.block_table is None:        # views, no copy
        return (inputs.q.view(batch, sq, case.heads_q, case.head_dim),
                inputs.k.view(batch, sk, case.heads_kv, case.head_dim),
                inputs.v.view(batch, sk, case.heads_kv, case.head_dim))
    if case.uniform:                   # a paged uniform batch: q as it is, the cache gathered
        q = inputs.q.view(batch, sq, case.heads_q, case.head_dim)
    else:
        q = inputs.q.new_zeros(batch, sq, case.heads_q, case.head_dim)
        for b in range(batch):
            q[b, :case.seqlens_q[b]] = inputs.q[sequence_rows(inputs, b)]
    k = inputs.k.new_zeros(batch, sk, case.heads_kv, case.head_dim)
    v = torch.zeros_like(k)
    for b in range(batch):
        k_b, v_b = sequence_keys(inputs, b)
        k[b, :case.seqlens_k[b]] = k_b
        v[b, :case.seqlens_k[b]] = v_b
    return q, k, v


# ---------------------------------------------------------------------------------------------- FlashCore

def flashcore_call(case: VarlenCase, inputs: VarlenInputs) -> Callable[[], torch.Tensor]:
    """The public call, with the config dispatch picks."""
    import flashcore
    api = flashcore.flash_attn_varlen_func
    i = inputs
    return lambda: api(i.q, i.k, i.v, i.cu_seqlens_q, i.cu_seqlens_k, i.max_seqlen_q, i.max_seqlen_k,
                       causal=case.causal, block_table=i.block_table)


def flashcore_default(case: VarlenCase, inputs: VarlenInputs) -> Callable[[], torch.Tensor]:
    """The op's host function with the heuristic default config (FLASHCORE_TUNING=off is read once per process, so
    it cannot serve one column), arguments as flash_attn_varlen_func passes them."""
    from . import OP, host
    from .tuning import launch
    i = inputs
    call = host.call_of(i.q, i.k, i.cu_seqlens_q, i.max_seqlen_q, i.max_seqlen_k, i.block_table, case.causal, False,
                        False, False)
    config = OP.default_config(host.make_spec(i.q, i.k, i.v, call))
    return lambda: launch(i, case.causal, config)


def flashcore_padded(case: VarlenCase, padded) -> Callable[[], torch.Tensor]:
    """flashcore.flash_attn_func on the padded batch (causal bottom-right: top-left for a square batch)."""
    import flashcore
    q, k, v = padded
    return lambda: flashcore.flash_attn_func(q, k, v, causal=case.causal)


# ---------------------------------------------------------------------------------------------- peers

def flashinfer_prefill(case: VarlenCase, inputs: VarlenInputs) -> Callable[[], Any]:
    """FlashInfer's batch prefill, NHD, planned here: the ragged wrapper on packed K/V, the paged one on the case's
    pages (page lists from its block table)."""
    if case.dtype != "bf16" or case.head_dim != 128:
        raise RuntimeError(f"FlashInfer {FLASHINFER_SKIP}")
    flashinfer = import_flashinfer()
    i, device = inputs, inputs.q.device
    dtype = TORCH_DTYPES[case.dtype]
    workspace = flashinfer_workspace(device)
    if i.block_table is None:
        wrapper = flashinfer.BatchPrefillWithRaggedKVCacheWrapper(workspace, "NHD")
        wrapper.plan(i.cu_seqlens_q, i.cu_seqlens_k, case.heads_q, case.heads_kv, case.head_dim, causal=case.causal,
                     q_data_type=dtype, kv_data_type=dtype)
        return lambda: wrapper.run(i.q, i.k, i.v)
    indptr, indices, last = (t.to(device) for t in flashinfer_csr(i.block_table.cpu(), list(i.seqlens_k),
                                                                   case.page_size))
    wrapper = flashinfer.BatchPrefillWithPagedKVCacheWrapper(workspace, "NHD")
    wrapper.plan(i.cu_seqlens_q, indptr, indices, last, case.heads_q, case.heads_kv, case.head_dim, case.page_size,
                 causal=case.causal, q_data_type=dtype, kv_data_type=dtype)
    return lambda: wrapper.run(i.q, (i.k, i.v))


def fa4_varlen(case: VarlenCase, inputs: VarlenInputs) -> Callable[[], Any]:
    """flash-attn 4's flash_attn_varlen_func: cu_seqlens on packed K/V; seqused_k and page_table on the paged cache
    (FA4 takes no cu_seqlens_k with a page table). num_splits 1 (FA4 has no split-KV on sm90)."""
    from flash_attn.cute import flash_attn_varlen_func
    i = inputs
    if i.block_table is None:
        return lambda: flash_attn_varlen_func(i.q, i.k, i.v, cu_seqlens_q=i.cu_seqlens_q, cu_seqlens_k=i.cu_seqlens_k,
                                              max_seqlen_q=i.max_seqlen_q, max_seqlen_k=i.max_seqlen_k,
                                              causal=case.causal, num_splits=1)
    return lambda: flash_attn_varlen_func(i.q, i.k, i.v, cu_seqlens_q=i.cu_seqlens_q, seqused_k=i.seqused_k,
                                          page_table=i.block_table, max_seqlen_q=i.max_seqlen_q, causal=case.causal,
                                          num_splits=1)


def probe_ms(fn: Callable[[], Any], calls: int = PROBE_CALLS) -> float:
    """Milliseconds per call of fn, after one untimed call (which raises if fn cannot run): CUDA events on a GPU,
    the wall clock elsewhere. A coarse ranking, not the suite's timing."""
    fn()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / calls
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) * 1e3 / calls


def sdpa_padded(case: VarlenCase, padded, found: dict | None = None,
                backends=tuple(SDPA_BACKENDS)) -> Callable[[], torch.Tensor]:
    """SDPA on the padded batch with its fastest backend: each of `backends` forced in turn, probed (probe_ms), the
    fastest returned; `found` gets {'sdpa_backend': name, 'sdpa_ms': {name: ms or the error}}."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    q, k, v = (t.transpose(1, 2) for t in padded)          # (B, H, S, D) views of the (B, S, H, D) copies
    kwargs: dict[str, Any] = {"enable_gqa": case.heads_q != case.heads_kv}
    if case.causal and q.shape[2] == k.shape[2]:
        kwargs["is_causal"] = True
    elif case.causal:                                      # chunks: the mask aligned bottom-right
        from torch.nn.attention.bias import causal_lower_right
        kwargs["attn_mask"] = causal_lower_right(q.shape[2], k.shape[2])
    timed, notes = {}, {}
    for name in backends:
        forced = getattr(SDPBackend, SDPA_BACKENDS[name])

        def run(forced=forced):
            with sdpa_kernel(forced):
                return F.scaled_dot_product_attention(q, k, v, **kwargs)
        try:
            timed[name] = (probe_ms(run), run)
            notes[name] = round(timed[name][0], 4)
        except Exception as exc:       # the backend cannot take the case (head dim, GQA, mask, dtype, device)
            notes[name] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ''}"
    if found is not None:
        found["sdpa_ms"] = notes
    if not timed:
        raise RuntimeError("no SDPA backend takes the padded batch: " + "; ".join(f"{n} {e}" for n, e in notes.items()))
    best = min(timed, key=lambda name: timed[name][0])
    if found is not None:
        found["sdpa_backend"] = best
    print(f"  sdpa: {best} fastest of " + ", ".join(f"{n} {v if isinstance(v, str) else f'{v:.3f} ms'}"
                                                   for n, v in notes.items()), flush=True)
    return timed[best][1]


def sdpa_nested(case: VarlenCase, inputs: VarlenInputs) -> Callable[[], torch.Tensor]:
    """SDPA on jagged nested tensors (B, H, j, D) built from the packed rows, fused backends only (no math
    fallback: it would materialize each sequence's scores). Jagged SDPA takes no GQA: K/V heads are repeated to
    Hq here, outside timing. Self-attention batches only: its causal mask is aligned top-left."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    if case.seqlens_q != case.seqlens_k:
        raise RuntimeError("jagged SDPA aligns a causal mask top-left: only self-attention batches")
    if inputs.block_table is not None:
        raise RuntimeError("jagged SDPA reads packed K/V, not a paged cache")
    offsets = inputs.cu_seqlens_q.long()
    lengths = dict(min_seqlen=min(case.seqlens_q), max_seqlen=max(case.seqlens_q))   # (no host sync per call)

    def nest(t):
        return torch.nested.nested_tensor_from_jagged(t, offsets, **lengths).transpose(1, 2)
    group = case.heads_q // case.heads_kv
    k, v = inputs.k, inputs.v
    if group > 1:
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    q, k, v = nest(inputs.q), nest(k), nest(v)
    fused = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]

    def run():
        with sdpa_kernel(fused):
            return F.scaled_dot_product_attention(q, k, v, is_causal=case.causal)
    return run


# ---------------------------------------------------------------------------------------------- check

def check_against_reference(case: VarlenCase, inputs: VarlenInputs, run: Callable[[], torch.Tensor]) -> dict:
    """FlashCore's output (total_q, Hq, D) from `run`, its first and last sequences against the float64 reference
    with the shared tolerance rule (each on its first and last CHECK_ROWS rows when longer); the part furthest over
    (or nearest to) its tolerance is reported."""
    out = run()
    return verdict(pair for b in sorted({0, case.batch - 1})
                   for pair in sequence_errors(out, inputs, b, case.causal, rows=CHECK_ROWS))


# ---------------------------------------------------------------------------------------------- suites

COMMON_NOTES = (
    "TFLOP/s: useful FLOPs, real tokens only (4 * Hq * D per (row, key) pair attended, causal bottom-right exactly); "
    "ms: the whole batch. FlashInfer: batch prefill (ragged, or paged on the case's pages), prebuilt bf16 D 128 "
    "modules only (n/a elsewhere). FA4: flash_attn_varlen_func (page_table on a paged cache). SDPA-padded: "
    "F.scaled_dot_product_attention on the zero-padded (B, S_max) batch, the fastest of cuDNN / flash / efficient "
    "(probed per case; the JSON's check.sdpa_backend); FC-padded: flashcore.flash_attn_func on the same padded "
    "batch (padding and unpadding not timed). FC/best: over the fastest peer (FC-default and FC-padded are FlashCore, "
    "never the best peer); varlen/padded: FlashCore varlen over FlashCore on the padded batch; tuned/default: "
    "dispatch's config over the heuristic default.")
CHECK_NOTE = ("check: FlashCore's output against the float64 reference (first and last sequences; a long one on its "
              f"first and last {CHECK_ROWS} rows).")


class _VarlenSuite(Suite):
    """Every varlen suite: cases of VarlenCase, the impls above by name."""
    unit = "TFLOP/s"
    labels = LABELS
    variants = ("default", "dense")
    ratios = {"best": "FC/best", "flashinfer": "FC/FlashInfer", "fa4": "FC/FA4", "dense": "varlen/padded",
              "default": "tuned/default"}
    peers: tuple[str, ...] = PEERS       # the peers this suite can run
    about = ""

    @property
    def notes(self) -> str:
        return f"{self.about} {COMMON_NOTES} {value_checks_note()} {CHECK_NOTE}"

    def varlen_cases(self, args) -> list[VarlenCase]:
        raise NotImplementedError

    def cases(self, args) -> list[Case]:
        return [case_of(case) for case in self.varlen_cases(args)]

    def impls(self, args) -> list[str]:
        peers = [] if args.varlen_peers == "none" else [x for x in args.varlen_peers.split(",") if x]
        unknown = [x for x in peers if x not in PEERS]
        if unknown:
            raise ValueError(f"--varlen-peers: unknown {', '.join(unknown)}; known: {', '.join(PEERS)}")
        return ["flashcore", *(["default"] if args.varlen_default else []), *(p for p in peers if p in self.peers)]

    def setup(self, case: Case, impls: list[str]) -> Prepared:
        call: VarlenCase = case.call
        inputs = inputs_of(call, "cuda")
        padded: list = []
        found: dict = {}

        def pad():
            if not padded:
                padded.append(padded_batch(call, inputs))
            return padded[0]
        builders = {"flashcore": lambda: flashcore_call(call, inputs),
                    "default": lambda: flashcore_default(call, inputs),
                    "flashinfer": lambda: flashinfer_prefill(call, inputs), "fa4": lambda: fa4_varlen(call, inputs),
                    "sdpa": lambda: sdpa_padded(call, pad(), found), "nested": lambda: sdpa_nested(call, inputs),
                    "dense": lambda: flashcore_padded(call, pad())}
        fns = {name: or_failing(builders[name]) for name in impls}

        def check() -> dict:
            return {**check_against_reference(call, inputs, fns["flashcore"]), **found}
        return Prepared(fns, check=check)

    def versions(self) -> dict[str, str]:
        return peer_versions()

    def setup_seconds(self, impls: list[str]) -> float:
        # inputs and the padded copy, the check's float64 reference, FlashInfer's plan, SDPA's backend probe
        # (3 backends x 4 calls); first compiles (FA4 per variant, FlashCore per spec and config) spread over the cases
        return 1.0 + 1.5 * ("fa4" in impls) + 1.0 * ("sdpa" in impls) + 1.0 * ("dense" in impls)


class Mixed(_VarlenSuite):
    name = "mixed"
    title = "Varlen prefill, mixed lengths (flash_attn_varlen_func)"
    about = (f"Causal self-attention over packed batches, lengths uniform in {MIXED_LOW}..{MIXED_HIGH} (seeded), "
             f"{' and '.join(_tokens(t) for t in MIXED_TOKENS)} tokens; bf16, D {HEAD_DIM}, Hq {HEADS_Q} / Hkv "
             f"{HEADS_KV}, then the {_tokens(MIXED_TOKENS[0])} batch in fp16, at D 64, at D 256 and MHA (32/32); "
             f"padded: 1 x {PADDED_LONG} + {PADDED_LOW}..{PADDED_HIGH} ({_tokens(MIXED_TOKENS[0])} tokens, mostly "
             f"padding when padded); uniform: {UNIFORM[0]} x {UNIFORM[1]} (varlen/padded is varlen over dense at the "
             "same shapes). "
             "SDPA-jagged: nested tensors sharing q's offsets, K/V heads repeated to Hq (jagged SDPA takes no GQA).")

    def add_arguments(self, group) -> None:
        """The options of every varlen suite (one parser for every suite of the run: added here once)."""
        group.add_argument("--varlen-peers", default=",".join(PEERS), help="comma list of " + ", ".join(PEERS) +
                           " (default all; one not installed is n/a; chunked runs no nested); 'none' times FlashCore "
                           "alone")
        group.add_argument("--varlen-default", action=argparse.BooleanOptionalAction, default=True,
                           help="also time FlashCore's heuristic default config (the tuned/default column)")
        group.add_argument("--varlen-quick", action="store_true",
                           help="smoke subset: mixed 16k bf16 only, skewed, chunked 512 against 16k at B=8")
        group.add_argument("--varlen-heavy", action="store_true",
                           help="add the heavy chunked rows (64k prefixes at batch 32: 18 and 71 TFLOP a call)")

    def varlen_cases(self, args) -> list[VarlenCase]:
        return mixed_cases(args.varlen_quick)


def _skewed_pairs() -> int:
    """(row, key) pairs the skewed batch attends, times 2 (causal)."""
    return SKEWED_LONG * (SKEWED_LONG + 1) + SKEWED_COUNT * SKEWED_SHORT * (SKEWED_SHORT + 1)


class Skewed(_VarlenSuite):
    name = "skewed"
    title = "Varlen prefill, one long sequence among short ones (flash_attn_varlen_func)"
    about = (f"Causal: 1 x {_tokens(SKEWED_LONG)} + {SKEWED_COUNT} x {SKEWED_SHORT} tokens (the long one first), and "
             f"the {_tokens(SKEWED_LONG)} sequence alone; bf16, D {HEAD_DIM}, Hq {HEADS_Q} / Hkv {HEADS_KV}. The floor "
             f"compares the batch's latency with the long sequence's alone (the short ones add "
             f"{SKEWED_COUNT * SKEWED_SHORT * (SKEWED_SHORT + 1) / (SKEWED_LONG * (SKEWED_LONG + 1)):.1%} of the "
             f"work). The padded batch is {SKEWED_COUNT + 1} x {_tokens(SKEWED_LONG)}: SDPA-padded and FC-padded "
             f"compute {(SKEWED_COUNT + 1) * SKEWED_LONG * (SKEWED_LONG + 1) / _skewed_pairs():.0f}x the useful work.")

    def varlen_cases(self, args) -> list[VarlenCase]:
        return skewed_cases()

    def setup_seconds(self, impls: list[str]) -> float:
        # the padded batch's peers: ~0.3 s a call on an H100 (141 TFLOP), ~25 calls each plus the probe
        return super().setup_seconds(impls) + 6.0 * ("sdpa" in impls) + 4.0 * ("dense" in impls)


class Chunked(_VarlenSuite):
    name = "chunked"
    title = "Chunked prefill against a paged KV cache (flash_attn_varlen_func with block_table)"
    peers = ("flashinfer", "fa4", "sdpa", "dense")
    about = ("Each sequence appends a chunk of new tokens (causal, bottom-right) to a prefix already in a paged cache "
             "(block tables shuffled over a pool holding exactly the blocks used); keys = prefix + chunk. bf16, D "
             f"{HEAD_DIM}, Hq {HEADS_Q} / Hkv {HEADS_KV}. SDPA-padded and FC-padded read a dense (B, prefix + chunk) "
             "copy of the cache (a uniform batch: no padding), SDPA with causal_lower_right. No SDPA-jagged: its "
             "causal mask is top-left aligned. [heavy]: --varlen-heavy only.")

    def varlen_cases(self, args) -> list[VarlenCase]:
        return chunked_cases(args.varlen_quick, args.varlen_heavy)

    def setup_seconds(self, impls: list[str]) -> float:
        # the dense copy of the cache (up to 9 GiB) and FA4's two paged variants (pages of 16: no TMA)
        return super().setup_seconds(impls) + 1.0 * ("sdpa" in impls or "dense" in impls)


SUITES = [Mixed(), Skewed(), Chunked()]
