"""attn_fwd's tuning declaration: search space, initial design, plan, benchmark problem.

Search space (sm80 / sm90): BLOCK_M x BLOCK_N x num_warps x num_stages (x WARP_SPECIALIZE on sm90+),
categorical. Static pruning before any compile is the op's own feasibility check (host.is_feasible: shared
memory, a register estimate, rows per warp, tiles no larger than the bucket needs), the one dispatch applies
to records. Under the CPU interpreter the space is a handful of small tiles.

Buckets (the op's axes): (next_pow2(seqlen_q), next_pow2(seqlen_k), next_pow2(batch * heads_q)).
The default GPU plan covers LLM serving and training prefill: a short single prompt (512 tokens, 32 heads:
latency-bound, fewer row blocks than SMs), a batch of 2k sequences (4 x 32 heads: training and batched prefill)
and an 8k long-context prompt (1 x 32 heads). Shapes between them use the nearest tuned bucket (log2 distance);
`flashcore-tune heldout` measures what that costs. x 2 dtypes x 3 head dims x causal or not x GQA 1 / 8.

Window and softcap specs (Mistral's and Gemma's; `--feature window=true` / `softcap=true`) tune on the models' own
values: a left window of 4096 keys (Mistral 7B, Gemma 2 / 3's local layers), at most half the bucket's keys so that
it masks at every bucket (right side 0 when causal, else the same), and a softcap of 50 (Gemma 2).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import torch

from ...counts import nbytes, useful_flops
from ...dtypes import TORCH_DTYPES
from ...generator import KernelSpec
from ...models import PREFILL_SHAPES, ModelHeads, tuned_scores
from ...reference import max_error
from ...tuning import CheckResult, Config, Problem, Tuning, input_sets
from ..base import Bucket
from . import OP
from .call import AttnFwdCall
from .host import attention_forward, default_config, make_spec


# Default plan: features swept and buckets (seqlen_q, seqlen_k, batch * heads_q).
GPU_AXES = {"dtype": ("bf16", "fp16"), "head_dim": (64, 128, 256), "causal": (False, True), "gqa_group": (1, 8),
            "window": (False,), "softcap": (False,)}
GPU_BUCKETS: tuple[Bucket, ...] = ((512, 512, 32), (2048, 2048, 128), (8192, 8192, 32))
# The interpreter's tl.dot is wrong for bf16: CPU tuning runs fp16 at a small head_dim.
INTERPRET_AXES = {"dtype": ("fp16",), "head_dim": (32,), "causal": (False, True), "gqa_group": (1,), "window": (False,),
                  "softcap": (False,)}
INTERPRET_BUCKETS: tuple[Bucket, ...] = ((32, 32, 2), (64, 64, 4))
HEADS = 32   # heads_q of the shapes tuned for a bucket (split from batch * heads)


def search_space(spec: KernelSpec, bucket: Bucket | None = None) -> dict[str, list[int]]:
    if spec["arch"] == 0:       # interpreter: num_warps / num_stages mean nothing there
        space = {"BLOCK_M": [16, 32, 64], "BLOCK_N": [16, 32, 64], "num_warps": [4], "num_stages": [1]}
    else:
        space = {"BLOCK_M": [64, 128, 256], "BLOCK_N": [32, 64, 128, 256], "num_warps": [4, 8, 16],
                 "num_stages": [1, 2, 3, 4, 5]}
        if spec["arch"] >= 90:
            space["WARP_SPECIALIZE"] = [0, 1]
    for name, value in default_config(spec).items():    # the default is always a point of the space
        if value not in space[name]:
            space[name] = sorted(space[name] + [value])
    return space


def initial_configs(spec: KernelSpec, bucket: Bucket | None) -> list[Config]:
    """A coarse grid over the tile shape, the tunable that matters most: every (BLOCK_M, BLOCK_N) with the usual
    warps (4 for 64 rows, 8 for 128, 16 for 256) and the deepest pipeline up to 3 stages that fits. The sampler
    refines warps, stages and warp specialization from there."""
    space = search_space(spec, bucket)
    default = default_config(spec)
    out = []
    for block_n in space["BLOCK_N"]:
        for block_m in space["BLOCK_M"]:
            warps = min(space["num_warps"], key=lambda w: abs(w - max(4, block_m // 16)))
            for stages in sorted((s for s in space["num_stages"] if s <= 3), reverse=True):
                config = {**default, "BLOCK_M": block_m, "BLOCK_N": block_n, "num_warps": warps,
                          "num_stages": stages}
                if "WARP_SPECIALIZE" in config:
                    config["WARP_SPECIALIZE"] = 0
                if OP.check_config(spec, config, bucket) is None:
                    out.append(config)
                    break
    return out


def plan_buckets(spec: KernelSpec, interpret: bool) -> list[Bucket]:
    return list(INTERPRET_BUCKETS if interpret else GPU_BUCKETS)


def call_for(features: dict[str, Any], coords: Sequence[int]) -> AttnFwdCall:
    """The call tuned for (seqlen_q, seqlen_k, batch * heads): heads_q = 32 (a multiple of the GQA group, at most
    batch * heads), the batch from the rest."""
    seqlen_q, seqlen_k, batch_heads = coords
    group = features.get("gqa_group", 1)
    heads_q = max(group, min(batch_heads, HEADS))
    heads_q -= heads_q % group
    return AttnFwdCall(batch=max(1, batch_heads // heads_q), seqlen_q=seqlen_q, seqlen_k=seqlen_k, heads_q=heads_q,
                       heads_kv=heads_q // group, head_dim=features.get("head_dim", 128),
                       dtype=features.get("dtype", "bf16"), causal=features.get("causal", False),
                       window=features.get("window", False), softcap=features.get("softcap", False))


def partial_tile_call(spec: KernelSpec, call: AttnFwdCall) -> AttnFwdCall:
    """A smaller call with the same integer specialization as `call` (multiples of 16 stay multiples of 16,
    so the kernel compiled for timing is the one checked) whose lengths are not multiples of the tiles."""
    base = 48 if spec["arch"] == 0 else 336             # 16 * odd: partial BLOCK_M / BLOCK_N tiles

    def like(n, target):
        return target if n % 16 == 0 else target + n % 16
    sq, sk = call.seqlen_q, call.seqlen_k
    if sq == sk:
        seqlen_q = seqlen_k = like(sq, base)
    elif sq < sk:
        seqlen_q, seqlen_k = like(sq, base), like(sk, 2 * base + 16)
    else:
        seqlen_q, seqlen_k = like(sq, 2 * base + 16), like(sk, base)
    heads_q = 16 if call.heads_q % 16 == 0 and call.gqa_group <= 16 else call.heads_q
    return dataclasses.replace(call, batch=2, seqlen_q=seqlen_q, seqlen_k=seqlen_k, heads_q=heads_q,
                               heads_kv=heads_q // call.gqa_group)


def _inputs(call: AttnFwdCall, device: str):
    dtype = TORCH_DTYPES[call.dtype]
    q = torch.randn(call.batch, call.seqlen_q, call.heads_q, call.head_dim, device=device, dtype=dtype)
    k = torch.randn(call.batch, call.seqlen_k, call.heads_kv, call.head_dim, device=device, dtype=dtype)
    return q, k, torch.randn_like(k)


def model_calls(model: ModelHeads, dtype: str) -> list[AttnFwdCall]:
    """A model's prefill calls: causal, each PREFILL_SHAPES (batch, tokens), for each kind of its layers."""
    return [AttnFwdCall(batch, tokens, tokens, m.heads_q, m.heads_kv, m.head_dim, dtype, causal=True,
                        window=m.window > 0, softcap=m.softcap > 0)
            for m in model.layers() for batch, tokens in PREFILL_SHAPES]


def attention_options(call: AttnFwdCall) -> dict:
    """flash_attn_func's keyword options of a tuned call (the reference's too; attn_bwd's problem uses them)."""
    return dict(causal=call.causal, **tuned_scores(call.causal, call.window, call.softcap, call.seqlen_k))


def flops_of(call: AttnFwdCall) -> float:
    """The FLOPs of a tuned call over the keys each row sees (a window's are not the causal half)."""
    return float(call.batch * useful_flops([call.seqlen_q], [call.seqlen_k], call.heads_q, call.head_dim, call.causal,
                                           attention_options(call)["window_size"]))


def _launch(q, k, v, call: AttnFwdCall, config: Config):
    options = attention_options(call)
    return attention_forward(q, k, v, call.head_dim ** -0.5, call.causal, *options["window_size"], options["softcap"],
                             False, config=config)[0]


def make_problem(spec: KernelSpec, call: AttnFwdCall, device: str) -> Problem:
    q, k, v = _inputs(call, device)
    runtime_spec = make_spec(q, k, v, call.causal, call.window, call.softcap)
    set_bytes = nbytes(q, k, v, q)
    n_sets = input_sets(set_bytes, device)
    sets = [(q, k, v)] + [_inputs(call, device) for _ in range(n_sets - 1)]

    def runner(config: Config):
        def run(i: int):
            qi, ki, vi = sets[i % n_sets]
            return _launch(qi, ki, vi, call, config)
        return run

    check_call = partial_tile_call(runtime_spec, call)

    def check(config: Config) -> CheckResult:
        cq, ck, cv = _inputs(check_call, device)
        out = _launch(cq, ck, cv, check_call, config)
        err, tol = max_error(out, cq, ck, cv, **attention_options(check_call))
        return CheckResult(ok=err <= tol, error=err, tolerance=tol, detail=f"checked on {check_call.describe()}")

    return Problem(spec=runtime_spec, call=call, bucket=OP.bucket_of(call), work=flops_of(call),
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
    heldout_axes=("seqlen_q", "seqlen_k"),
    quantum=lambda spec: 16 if spec["arch"] == 0 else 64,
    model_calls=model_calls,
)
