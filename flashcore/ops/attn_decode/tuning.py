"""attn_decode's tuning declaration: search space, initial design, plan, benchmark problem.

Search space: BLOCK_N x num_warps x num_stages of the decode kernel, num_splits (0 = the heuristic, or a fixed
count) and combine.num_warps, categorical; static pruning is the op's own feasibility check (host.is_feasible).

Buckets (the op's axes): (next_pow2(batch * heads_kv), next_pow2(cache capacity), next_pow2(seqlen_q)). A bucket is
tuned on its upper corner with every cache full (the most bytes to read). The default GPU plan: one decode token,
Hq 32 / Hkv 8, D 128, bf16; batch 1 / 4 / 16 / 64 (8 .. 512 sequence-heads) x caches of 1k / 8k / 32k / 128k
(batch 64 at 128k left out: 64 GiB), for the contiguous cache and paged blocks of 16 and 128; the other block
sizes (32, 64, 256) on two buckets each. Nearest-bucket dispatch covers the rest with the neighbour's tiles and the
split heuristic (num_splits is a per-bucket tunable: a tuned count belongs to its bucket).

Window and softcap specs (Mistral's and Gemma's local layers: the models plan, or --feature) tune on the models'
values (flashcore/models.py: a window of at most half the cache, so that it masks; softcap 50); a window's work is
the bytes of the keys it reads.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import torch

from ...dtypes import TORCH_DTYPES
from ...generator import KernelSpec
from ...models import DECODE_PAGES, DECODE_SHAPES, ModelHeads, tuned_scores
from ...reference import kvcache_ref, kvcache_tolerance
from ...tuning import CheckResult, Config, Problem, Tuning, input_sets
from ..base import Bucket
from . import OP
from .call import AttnDecodeCall
from .host import decode_attention, default_config, runtime_spec, sms_of, split_merge

HEADS_KV = 8

# (causal, window, softcap: False by default; `--feature window=true causal=true` or the models plan sweeps them)
GPU_AXES = {"dtype": ("bf16",), "head_dim": (128,), "gqa_group": (4,), "page_size": (0, 16, 32, 64, 128, 256),
            "causal": (False,), "window": (False,), "softcap": (False,)}
# batch 1 / 4 / 16 / 64 (x Hkv 8) x caches 1k / 8k / 32k / 128k, but batch 64 at 128k (64 GiB of cache)
GPU_BUCKETS: tuple[Bucket, ...] = tuple((batch_heads, cache, 1) for cache in (1024, 8192, 32768, 131072)
                                        for batch_heads in (8, 32, 128, 512) if batch_heads * cache < 512 * 131072)
GPU_BUCKETS_FEW: tuple[Bucket, ...] = ((8, 32768, 1), (128, 8192, 1))       # block sizes 32, 64, 256
INTERPRET_AXES = {"dtype": ("fp16",), "head_dim": (32,), "gqa_group": (2,), "page_size": (0, 16), "causal": (False,),
                  "window": (False,), "softcap": (False,)}
INTERPRET_BUCKETS: tuple[Bucket, ...] = ((4, 64, 1), (8, 128, 2))


def search_space(spec: KernelSpec, bucket: Bucket | None = None) -> dict[str, list[int]]:
    if spec["arch"] == 0:
        space = {"BLOCK_N": [16, 32], "num_warps": [4], "num_stages": [1], "num_splits": [0, 1, 2],
                 "combine.num_warps": [1]}
    else:
        space = {"BLOCK_N": [16, 32, 64, 128, 256], "num_warps": [2, 4, 8], "num_stages": [2, 3, 4, 5],
                 "num_splits": [0, 1, 2, 4, 8, 16, 32, 64, 128], "combine.num_warps": [1, 2, 4]}
    for name, value in default_config(spec).items():    # the default is always a point of the space
        if value not in space[name]:
            space[name] = sorted(space[name] + [value])
    return space


def initial_configs(spec: KernelSpec, bucket: Bucket | None) -> list[Config]:
    """Each key tile with the heuristic's splits, then the default tile with a few fixed split counts: the two
    tunables that decide how much of the cache each program streams."""
    space, default = search_space(spec, bucket), default_config(spec)
    candidates = [{**default, "BLOCK_N": n} for n in space["BLOCK_N"]]
    candidates += [{**default, "num_splits": n} for n in space["num_splits"] if n in (1, 4, 16, 64)]
    return [c for c in candidates if c != default and OP.check_config(spec, c, bucket) is None]


def plan_buckets(spec: KernelSpec, interpret: bool) -> list[Bucket]:
    if interpret:
        return list(INTERPRET_BUCKETS)
    return list(GPU_BUCKETS if spec["page_size"] in (0, 16, 128) else GPU_BUCKETS_FEW)


def model_calls(model: ModelHeads, dtype: str) -> list[AttnDecodeCall]:
    """A model's decode steps (one query token, causal), each DECODE_SHAPES (batch, cached tokens), on a contiguous
    cache and on pages (DECODE_PAGES), for each kind of its layers."""
    return [AttnDecodeCall(batch, 1, m.heads_q, m.heads_kv, m.head_dim, cache, dtype, page_size=page, causal=True,
                           window=m.window > 0, softcap=m.softcap > 0)
            for m in model.layers() for batch, cache in DECODE_SHAPES for page in DECODE_PAGES]


def scores_of(call: AttnDecodeCall) -> dict:
    """The window_size and softcap a call is tuned and checked with (models.tuned_scores over its cache)."""
    return tuned_scores(call.causal, call.window, call.softcap, call.cache_len)


def call_for(features: dict[str, Any], coords: Sequence[int]) -> AttnDecodeCall:
    """The call tuned for (batch * heads_kv, cache_len, seqlen_q): heads_kv 8 (fewer if the bucket is smaller), the
    batch from the rest, and a capacity rounded up to whole blocks."""
    batch_heads, cache_len, seqlen_q = coords
    heads_kv = max(1, min(HEADS_KV, batch_heads))
    page = features.get("page_size", 0)
    if page:
        cache_len = math.ceil(cache_len / page) * page
    return AttnDecodeCall(batch=max(1, batch_heads // heads_kv), seqlen_q=seqlen_q,
                          heads_q=heads_kv * features.get("gqa_group", 1), heads_kv=heads_kv,
                          head_dim=features.get("head_dim", 128), cache_len=cache_len,
                          dtype=features.get("dtype", "bf16"), page_size=page,
                          causal=features.get("causal", False), window=features.get("window", False),
                          softcap=features.get("softcap", False))


def launched_as(spec: KernelSpec, bucket: Bucket | None, config: Config) -> Config:
    """The config as the bucket's call launches it on this machine's GPU (without one, with the SMs the host counts
    under the interpreter: host.sms_of): num_splits resolved (0: the heuristic's count), combine.num_warps 0 where
    no combine kernel runs (one split, or splits merged inline)."""
    if bucket is None:
        return config
    call = call_for(dict(spec.features), bucket)
    batch_heads = call.batch * call.heads_kv
    gpu = torch.cuda.is_available()
    sms = sms_of(torch.device("cuda", torch.cuda.current_device()) if gpu else torch.device("cpu"))
    splits, _, _, combine = split_merge(0, config, batch_heads, call.cache_len, call.seqlen_q * spec["gqa_group"],
                                        call.head_dim, sms)
    return {**config, "num_splits": splits, "combine.num_warps": config["combine.num_warps"] if combine else 0}


def inputs(call: AttnDecodeCall, device: str, seqlens: torch.Tensor | None = None, generator=None):
    """(q, k_cache, v_cache, cache_seqlens, block_table) for `call`: every sequence full unless `seqlens` is given;
    a paged cache gets a shuffled block table over exactly the blocks it needs."""
    dtype = TORCH_DTYPES[call.dtype]
    q = torch.randn(call.batch, call.seqlen_q, call.heads_q, call.head_dim, device=device, dtype=dtype)
    if call.page_size:
        blocks = call.batch * (call.cache_len // call.page_size)
        shape = (blocks, call.page_size, call.heads_kv, call.head_dim)
        block_table = torch.randperm(blocks, device=device).to(torch.int32).view(call.batch, -1)
    else:
        shape = (call.batch, call.cache_len, call.heads_kv, call.head_dim)
        block_table = None
    k_cache = torch.randn(shape, device=device, dtype=dtype)
    v_cache = torch.randn(shape, device=device, dtype=dtype)
    if seqlens is None:
        seqlens = torch.full((call.batch,), call.cache_len, dtype=torch.int32, device=device)
    return q, k_cache, v_cache, seqlens, block_table


def _launch(q, k_cache, v_cache, seqlens, block_table, call: AttnDecodeCall, config: Config):
    scores = scores_of(call)
    return decode_attention(q, k_cache, v_cache, None, None, None, None, seqlens, 0, None, None, block_table,
                            call.head_dim ** -0.5, call.causal, *scores["window_size"], scores["softcap"], True, None,
                            0, False, config=config)[0]


def make_problem(spec: KernelSpec, call: AttnDecodeCall, device: str) -> Problem:
    if call.alibi:
        raise NotImplementedError("the decode tuning problem does not cover ALiBi specs yet")
    first = inputs(call, device)
    set_bytes = call.kv_bytes
    n_sets = input_sets(set_bytes, device)
    sets = [first] + [inputs(call, device) for _ in range(n_sets - 1)]

    def runner(config: Config):
        def run(i: int):
            return _launch(*sets[i % n_sets], call, config)
        return run

    # checked on a smaller cache whose sequences have different lengths (the last one full, one empty)
    check_call = dataclasses.replace(call, batch=3, cache_len=min(call.cache_len, 2048 if spec["arch"] else 128))

    def check(config: Config) -> CheckResult:
        lens = torch.tensor([check_call.cache_len // 3, 0, check_call.cache_len], dtype=torch.int32, device=device)
        q, k_cache, v_cache, seqlens, block_table = inputs(check_call, device, lens)
        out = _launch(q, k_cache, v_cache, seqlens, block_table, check_call, config)
        kwargs = dict(cache_seqlens=seqlens, block_table=block_table, causal=check_call.causal,
                      **scores_of(check_call))
        err = (out.double() - kvcache_ref(q, k_cache, v_cache, **kwargs)[0]).abs().max().item()
        tol = kvcache_tolerance(q, k_cache, v_cache, **kwargs)
        ok = math.isfinite(err) and err <= tol
        return CheckResult(ok=ok, error=err, tolerance=tol, detail=f"checked on {check_call.describe()}")

    # bytes of the keys a full sequence's query reads: a window's only
    left = scores_of(call)["window_size"][0]
    work = call.kv_bytes * (min(left + 1, call.cache_len) / call.cache_len if left >= 0 else 1.0)
    return Problem(spec=runtime_spec(call, first[0]), call=call, bucket=OP.bucket_of(call), work=work,
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
    heldout_axes=("cache_len",),
    quantum=lambda spec: max(16, spec["page_size"]),
    model_calls=model_calls,
    launched_as=launched_as,
)
