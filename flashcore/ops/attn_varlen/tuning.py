"""attn_varlen's tuning declaration: search space, initial design, plan, benchmark problem.

Search space (sm80 / sm90): BLOCK_M x BLOCK_N x num_warps x num_stages, categorical; static pruning is the op's
own feasibility check (host.is_feasible: shared memory, a register estimate, rows per warp, tiles no larger than
the bucket's longest sequences). Under the CPU interpreter a handful of small tiles.

Buckets (the op's axes): (next_pow2(total_q * heads_q), next_pow2(max_seqlen_q), next_pow2(max_seqlen_k)). A bucket
is measured on a DISTRIBUTION of lengths, not one dense corner (workload.bucket_lengths, seeded: the same batch on
every machine): total_q tokens in all, its first sequence at the corner, the rest drawn. Packed K/V (page_size 0):
a mixed prefill batch, lengths from max_seqlen_q / 64 up to max_seqlen_q, self-attention. Paged specs: a
chunked-prefill batch, chunks of max_seqlen_q new tokens against prefixes in the cache, keys up to max_seqlen_k.
Heads: Hq 32 (Hkv 32 / gqa_group); a bucket under 32 x 1024 token-heads gets fewer (down to one KV head) so that it
keeps its tokens: the interpreter's tiny buckets.

The default GPU plan, the bench suites' cases (bench.py) and their neighbours:
    packed   4k tokens of up to 1k (2^17, 1024, 1024); 16k and 64k tokens of up to 4k (2^19 / 2^21, 4096, 4096: the
             mixed suite); 32k tokens of up to 16k (2^20, 16384, 16384: the skewed batch)
    paged    chunks of 512 against 4k keys at batch 8 (2^17, 512, 8192); against 16k at batch 32 (2^19, 512, 32768);
             chunks of 2048 against 16k at batch 8 (2^19, 2048, 32768) and against 64k at batch 1 (2^16, 2048,
             131072): the chunked suite's keys are prefix + chunk, hence the next power of two
x dtype bf16 / fp16 x head_dim 64 / 128 / 256 x causal or not x page_size 0 / 16 / 128 x gqa_group 1 / 4 (72 specs,
288 buckets: restrict with --dtypes / --head-dims / --feature). Work: useful FLOPs of the real tokens
(counts.useful_flops), so the metric is the rate the bench reports.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from ...counts import useful_flops
from ...generator import KernelSpec
from ...models import VARLEN_CHUNKED, VARLEN_PACKED, VARLEN_PAGE, ModelHeads, tuned_scores
from ...reference import attention_ref, tolerance
from ...tuning import CheckResult, Config, Problem, Tuning, input_sets
from ..base import Bucket
from . import OP
from .call import AttnVarlenCall
from .host import default_config, make_spec, varlen_attention
from .workload import (VarlenInputs, blocks_of, bucket_lengths, even_lengths, input_bytes, make_inputs,
                       sequence_keys, sequence_rows)

HEADS = 32              # heads_q of the calls tuned for a bucket
MIN_TOKENS = 1024       # a bucket keeps at least this many tokens (fewer heads) when it can

GPU_AXES = {"dtype": ("bf16", "fp16"), "head_dim": (64, 128, 256), "causal": (False, True),
            "page_size": (0, 16, 128), "gqa_group": (1, 4), "window": (False,), "softcap": (False,)}
PACKED_BUCKETS: tuple[Bucket, ...] = ((1 << 17, 1024, 1024), (1 << 19, 4096, 4096), (1 << 21, 4096, 4096),
                                      (1 << 20, 16384, 16384))
PAGED_BUCKETS: tuple[Bucket, ...] = ((1 << 17, 512, 8192), (1 << 19, 512, 32768), (1 << 19, 2048, 32768),
                                     (1 << 16, 2048, 131072))
# The interpreter's tl.dot is wrong for bf16: CPU tuning runs fp16 at a small head_dim, two query heads on one KV head.
INTERPRET_AXES = {"dtype": ("fp16",), "head_dim": (32,), "causal": (True,), "page_size": (0, 16), "gqa_group": (2,),
                  "window": (False,), "softcap": (False,)}
INTERPRET_PACKED: tuple[Bucket, ...] = ((256, 64, 64),)       # 128 tokens, heads 2 / 1: 64 + draws from 1..64
INTERPRET_PAGED: tuple[Bucket, ...] = ((256, 32, 128),)       # 4 chunks of 32 against up to 128 keys
CHECK_LONG = {True: 45, False: 349}     # interpreter / GPU: the check's longest query run (not a tile multiple)
MAX_CHECK_BATCH = 256                   # sequences of the check (from 256 on the kernel's SEQ_CHUNK is the same)


def search_space(spec: KernelSpec, bucket: Bucket | None = None) -> dict[str, list[int]]:
    if spec["arch"] == 0:       # interpreter: num_warps / num_stages mean nothing there
        space = {"BLOCK_M": [16, 32], "BLOCK_N": [16, 32], "num_warps": [4], "num_stages": [1]}
    else:
        space = {"BLOCK_M": [32, 64, 128, 256], "BLOCK_N": [32, 64, 128, 256], "num_warps": [4, 8, 16],
                 "num_stages": [1, 2, 3, 4, 5]}
    for name, value in default_config(spec).items():    # the default is always a point of the space
        if value not in space[name]:
            space[name] = sorted(space[name] + [value])
    return space


def initial_configs(spec: KernelSpec, bucket: Bucket | None) -> list[Config]:
    """A coarse grid over the tile shape, the tunable that decides how much of a short sequence's last row block is
    wasted: every (BLOCK_M, BLOCK_N) with the usual warps (4 for up to 64 rows, 8 for 128, 16 for 256) and the
    deepest pipeline up to 3 stages that fits, nearest 128 x 128 first (the dense forward's winner at long
    sequences on the H100), so that a short study measures the large tiles before the thin ones (an 8-trial study
    in grid order never reached 128 x 128). The sampler refines warps and stages from there."""
    space, default = search_space(spec, bucket), default_config(spec)
    out = []
    for block_n in space["BLOCK_N"]:
        for block_m in space["BLOCK_M"]:
            warps = min(space["num_warps"], key=lambda w: abs(w - max(4, block_m // 16)))
            for stages in sorted((s for s in space["num_stages"] if s <= 3), reverse=True):
                config = {**default, "BLOCK_M": block_m, "BLOCK_N": block_n, "num_warps": warps,
                          "num_stages": stages}
                if OP.check_config(spec, config, bucket) is None:
                    if config != default:
                        out.append(config)
                    break
    return sorted(out, key=lambda c: abs(math.log2(c["BLOCK_M"] / 128)) + abs(math.log2(c["BLOCK_N"] / 128)))


def plan_buckets(spec: KernelSpec, interpret: bool) -> list[Bucket]:
    if interpret:
        return list(INTERPRET_PAGED if spec["page_size"] else INTERPRET_PACKED)
    return list(PAGED_BUCKETS if spec["page_size"] else PACKED_BUCKETS)


def heads_for(tokens_heads: int, group: int) -> int:
    """Hq of a bucket's call: HEADS, fewer where the bucket would keep under MIN_TOKENS tokens; a multiple of the
    GQA group, at least one KV head."""
    heads = min(HEADS, max(group, tokens_heads // MIN_TOKENS))
    return max(group, heads - heads % group)


def call_for(features: dict[str, Any], coords: Sequence[int]) -> AttnVarlenCall:
    """The call tuned for (total_q * heads_q, max_seqlen_q, max_seqlen_k): its batch is bucket_lengths' for the
    tokens (lengths_of rebuilds the same lengths from the call)."""
    tokens_heads, max_q, max_k = (max(1, int(c)) for c in coords)
    group = features.get("gqa_group", 1)
    heads_q = heads_for(tokens_heads, group)
    total_q = max(1, tokens_heads // heads_q)
    q_lens, _ = bucket_lengths(total_q, max_q, max_k)
    return AttnVarlenCall(batch=len(q_lens), total_q=total_q, max_seqlen_q=max_q, max_seqlen_k=max_k,
                          heads_q=heads_q, heads_kv=heads_q // group, head_dim=features.get("head_dim", 128),
                          dtype=features.get("dtype", "bf16"), page_size=features.get("page_size", 0),
                          causal=features.get("causal", False), window=features.get("window", False),
                          softcap=features.get("softcap", False), alibi=features.get("alibi", False))


def model_calls(model: ModelHeads, dtype: str) -> list[AttnVarlenCall]:
    """A model's prefill batches in a server (models.VARLEN_PACKED, VARLEN_CHUNKED), causal, for each kind of its
    layers."""
    calls = []
    for m in model.layers():
        heads = dict(heads_q=m.heads_q, heads_kv=m.heads_kv, head_dim=m.head_dim, dtype=dtype, causal=True,
                     window=m.window > 0, softcap=m.softcap > 0)
        calls += [AttnVarlenCall(tokens // longest, tokens, longest, longest, **heads)
                  for tokens, longest in VARLEN_PACKED]
        calls += [AttnVarlenCall(seqs, seqs * chunk, chunk, keys, page_size=VARLEN_PAGE, **heads)
                  for seqs, chunk, keys in VARLEN_CHUNKED]
    return calls


def lengths_of(call: AttnVarlenCall) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(query lengths, key lengths) a call is measured on: bucket_lengths' batch, or (a call made elsewhere, e.g.
    `flashcore-tune heldout --shape`, with another batch) that many sequences of nearly equal lengths."""
    q, k = bucket_lengths(call.total_q, call.max_seqlen_q, call.max_seqlen_k)
    if len(q) == call.batch:
        return q, k
    return even_lengths(call.batch, call.total_q, call.max_seqlen_q, call.max_seqlen_k)


def _inputs(call: AttnVarlenCall, q_lens, k_lens, device: str, spare_blocks: int = 0) -> VarlenInputs:
    return make_inputs(q_lens, k_lens, call.heads_q, call.heads_kv, call.head_dim, call.dtype, call.page_size,
                       device, max_seqlen_q=call.max_seqlen_q, max_seqlen_k=call.max_seqlen_k,
                       spare_blocks=spare_blocks)


def launch(inputs: VarlenInputs, causal: bool, config: Config, window_size: tuple[int, int] = (-1, -1),
           softcap: float = 0.0):
    """The op's host function with an explicit config, arguments as flash_attn_varlen_func passes them (default
    scale, causal folded into window_right = 0)."""
    left, right = window_size
    return varlen_attention(inputs.q, inputs.k, inputs.v, inputs.cu_seqlens_q, inputs.cu_seqlens_k,
                            inputs.max_seqlen_q, inputs.max_seqlen_k, inputs.q.shape[-1] ** -0.5, causal, left,
                            0 if causal else right, softcap, False, None, inputs.block_table, config=config)[0]


def scores_of(call: AttnVarlenCall) -> dict:
    """The window_size and softcap a call is tuned and checked with (models.tuned_scores over its longest keys)."""
    return tuned_scores(call.causal, call.window, call.softcap, call.max_seqlen_k)


def _like16(lengths: list[int], total_like: int, limit: int, floor: Sequence[int] | None = None) -> list[int]:
    """lengths with their sum a multiple of 16 exactly when total_like is one (Triton specializes integer arguments
    on divisibility by 16: the check then runs the kernel the timing compiled), one sequence changed by under 16
    tokens and kept within [floor, limit] (floor: 1 unless given)."""
    out = list(lengths)
    total = sum(out)
    want = total_like % 16 == 0
    if not out or (total % 16 == 0) == want:
        return out
    up, down = ((-total) % 16, 16 - (-total) % 16) if want else (1, 1)
    for b in reversed(range(len(out))):         # the last sequences first (the check's leading ones stay as made)
        if out[b] + up <= limit:
            out[b] += up
            return out
        if out[b] - down >= (floor[b] if floor else 1):
            out[b] -= down
            return out
    return out


def check_lengths(call: AttnVarlenCall, interpret: bool, like_k: int) -> tuple[list[int], list[int], int]:
    """(query lengths, key lengths, spare blocks) of the check: few keys (a float64 reference per sequence), runs
    that are not tile multiples, a one-token sequence, a sequence at each extreme of the prefix; the call's batch
    (up to MAX_CHECK_BATCH: the kernel's SEQ_CHUNK depends on it) and, for Triton's specialization, the
    divisibility by 16 of its total_q and total_k (like_k: the timed k's rows, or blocks of a paged cache)."""
    long_q = min(call.max_seqlen_q, CHECK_LONG[interpret])
    long_q -= 3 if long_q % 16 == 0 and long_q > 16 else 0        # a partial row block
    batch = max(1, min(call.batch, MAX_CHECK_BATCH))
    q = [long_q, 1, max(1, min(long_q, long_q // 3 + 5)), max(1, long_q - 7)]
    q = (q + [1 + (3 * b) % 11 for b in range(batch)])[:batch]          # the rest: short runs of 1..11 tokens
    q = _like16(q, call.total_q, call.max_seqlen_q)
    if call.max_seqlen_k == call.max_seqlen_q:                          # self-attention
        k = list(q)
    elif call.max_seqlen_k > call.max_seqlen_q:                         # chunked: a prefix before each run
        long_k = min(call.max_seqlen_k, 3 * long_q + 16)
        prefixes = [long_k - q[0], 0, long_k // 2, long_k // 3] + [5 * b % 37 for b in range(batch)]
        k = [min(call.max_seqlen_k, n + p) for n, p in zip(q, prefixes)]
        if not call.page_size:
            k = _like16(k, like_k, call.max_seqlen_k, floor=q)
    else:                                                               # queries past the keys
        k = [max(1, n * call.max_seqlen_k // call.max_seqlen_q) for n in q]
        if not call.page_size:
            k = _like16(k, like_k, call.max_seqlen_k)
    spare = 0
    if call.page_size:          # total_k is the pool's blocks: spare ones (never referenced) match its divisibility
        blocks = sum(blocks_of(k, call.page_size))
        spare = next(s for s in range(16) if ((blocks + s) % 16 == 0) == (like_k % 16 == 0))
    return q, k, spare


def references(inputs: VarlenInputs, causal: bool, window_size: tuple[int, int] = (-1, -1),
               softcap: float = 0.0) -> list[tuple[slice, torch.Tensor, float]]:
    """(rows, float64 reference output (Sq, Hq, D), tolerance) of every sequence: reference.tolerance for the
    sequence's own shapes, the rule assert_close_varlen applies (the window and softcap as `launch` takes them)."""
    options = dict(causal=causal, window_size=window_size, softcap=softcap)
    out = []
    for b in range(inputs.batch):
        rows = sequence_rows(inputs, b)
        q = inputs.q[rows][None]
        k, v = (t[None] for t in sequence_keys(inputs, b))
        out.append((rows, attention_ref(q, k, v, **options)[0][0], tolerance(q, k, v, **options)))
    return out


def check_output(out: torch.Tensor, inputs: VarlenInputs, causal: bool, refs=None) -> CheckResult:
    """Every sequence of `out` against the float64 reference (`refs`: references(inputs, causal), made once), each
    within its own tolerance; the sequence furthest over (or nearest to) its tolerance is reported (NaN or inf: an
    infinite error)."""
    refs = references(inputs, causal) if refs is None else refs
    worst = (0.0, 1.0, None)
    for b, (rows, ref, tol) in enumerate(refs):
        err = (out[rows].double() - ref).abs().max().item() if ref.numel() else 0.0
        err = err if math.isfinite(err) else math.inf
        if worst[2] is None or err / tol > worst[0] / worst[1]:
            worst = (err, tol, b)
    err, tol, b = worst
    where = "" if b is None else f"worst: sequence {b} ({inputs.seqlens_q[b]} rows, {inputs.seqlens_k[b]} keys)"
    return CheckResult(ok=err <= tol, error=err, tolerance=tol, detail=where)


def make_problem(spec: KernelSpec, call: AttnVarlenCall, device: str) -> Problem:
    if call.alibi:
        raise NotImplementedError("the varlen tuning problem does not cover ALiBi specs yet")
    scores = scores_of(call)
    q_lens, k_lens = lengths_of(call)
    first = _inputs(call, q_lens, k_lens, device)
    n_sets = input_sets(input_bytes(first), device)
    sets = [first] + [_inputs(call, q_lens, k_lens, device) for _ in range(n_sets - 1)]
    runtime_spec = make_spec(first.q, first.k, first.v, call)

    def runner(config: Config):
        def run(i: int):
            return launch(sets[i % n_sets], call.causal, config, **scores)
        return run

    # checked on a small batch with the same kernel specialization, every sequence against the float64 reference
    # (made once, on the first check: the inputs are the same for every config)
    check_q, check_k, spare = check_lengths(call, runtime_spec["arch"] == 0, first.k.shape[0])
    check_inputs = _inputs(call, check_q, check_k, device, spare_blocks=spare)
    refs: list = []

    def check(config: Config) -> CheckResult:
        if not refs:
            refs.append(references(check_inputs, call.causal, **scores))
        result = check_output(launch(check_inputs, call.causal, config, **scores), check_inputs, call.causal,
                              refs[0])
        result.detail = f"checked on {check_inputs.batch} sequences, {sum(check_q)} tokens; {result.detail}"
        return result

    work = useful_flops(q_lens, k_lens, call.heads_q, call.head_dim, call.causal, scores["window_size"])
    return Problem(spec=runtime_spec, call=call, bucket=OP.bucket_of(call), work=float(work),
                   metric_unit=OP.metric_unit, n_sets=n_sets, runner=runner, check=check, device=device)


TUNING = Tuning(
    op=OP,
    plan_axes=dict(GPU_AXES),
    search_space=search_space,
    plan_buckets=plan_buckets,
    call_for=call_for,
    make_problem=make_problem,
    interpret_axes=dict(INTERPRET_AXES),
    initial_configs=initial_configs,
    heldout_axes=("tokens*heads", "max_seqlen_q", "max_seqlen_k"),
    quantum=lambda spec: 16,
    model_calls=model_calls,
)
