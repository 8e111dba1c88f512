"""The forward template's tuning declaration: search space, static pruning, buckets, plan, benchmark problem.

Search space (sm80 / sm90): BLOCK_M x BLOCK_N x num_warps x num_stages (x WARP_SPECIALIZE on sm90+),
categorical. Static pruning before any compile: shared memory (num_stages buffers of the
K and V tiles, + the Q tile without tensor descriptors; matches what Triton 3.6 on an H100 reports), a
register estimate (fp32 accumulator + scores per thread), rows per warp, and
tiles no larger than the bucket needs. Under the CPU interpreter the space is a handful of small tiles.

Buckets: forward.shape_bucket -> (next_pow2(seqlen_q), next_pow2(seqlen_k), next_pow2(batch * heads_q)).
The default GPU plan covers LLM serving and training prefill: a short single prompt (512 tokens, 32 heads:
latency-bound, fewer row blocks than SMs), a batch of 2k sequences (4 x 32 heads: training and batched prefill)
and an 8k long-context prompt (1 x 32 heads). Shapes between them use the nearest tuned bucket (log2 distance);
`flashcore-tune heldout` measures what that costs. x 2 dtypes x 3 head dims x causal or not x GQA 1 / 8.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import triton

from . import forward
from .generator import KernelSpec
from .tunable import Bucket, CheckResult, Config, Problem, Tunable

TEMPLATE = forward.TEMPLATE
TORCH_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}

MAX_REGS_PER_THREAD = 255
REGS_PER_BLOCK = 65536          # a block's threads share the register file: 16 warps get 128 registers each

# Default plan: features swept and buckets (seqlen_q, seqlen_k, batch * heads_q).
GPU_AXES = {"dtype": ("bf16", "fp16"), "head_dim": (64, 128, 256), "causal": (False, True), "gqa_group": (1, 8)}
GPU_BUCKETS: tuple[Bucket, ...] = ((512, 512, 32), (2048, 2048, 128), (8192, 8192, 32))
# The interpreter's tl.dot is wrong for bf16: CPU tuning runs fp16 at a small head_dim.
INTERPRET_AXES = {"dtype": ("fp16",), "head_dim": (32,), "causal": (False, True), "gqa_group": (1,)}
INTERPRET_BUCKETS: tuple[Bucket, ...] = ((32, 32, 2), (64, 64, 4))
HEADS = 32   # heads_q of the shapes tuned for a bucket (split from batch * heads)


def _block_d(head_dim: int) -> int:
    return triton.next_power_of_2(head_dim)


def spec_for(arch: int, dtype: str = "bf16", head_dim: int = 128, causal: bool = False, gqa_group: int = 1,
             window: bool = False, softcap: bool = False) -> KernelSpec:
    """What forward.make_spec builds on a GPU of capability `arch` for contiguous, 16-byte aligned inputs."""
    return forward.build_spec(arch, dtype, head_dim, causal, window, softcap, gqa_group)


def default_config(spec: KernelSpec) -> Config:
    """forward.default_config, with every tunable of the space spelled out (WARP_SPECIALIZE=0 is the kernel's
    own default), so that the default is one point of the space."""
    config = dict(forward.default_config(spec))
    if spec["arch"] >= 90:
        config.setdefault("WARP_SPECIALIZE", 0)
    return config


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


def regs_per_thread(spec: KernelSpec, config: Config) -> float:
    """fp32 accumulator (BLOCK_M x BLOCK_D) + fp32 scores and their 16-bit copy (BLOCK_M x BLOCK_N x 1.5)."""
    block_d = _block_d(spec["head_dim"])
    words = config["BLOCK_M"] * block_d + 1.5 * config["BLOCK_M"] * config["BLOCK_N"]
    return words / (config["num_warps"] * 32)


def is_feasible(spec: KernelSpec, config: Config, bucket: Bucket | None = None) -> str | None:
    block_m, block_n = config["BLOCK_M"], config["BLOCK_N"]
    num_warps, num_stages = config["num_warps"], config["num_stages"]
    for name, value in (("BLOCK_M", block_m), ("BLOCK_N", block_n)):
        if not 16 <= value <= 256 or value & (value - 1):
            return f"{name}={value}: tiles are powers of two in [16, 256] (tl.dot, TMA boxes)"
    if num_warps not in (1, 2, 4, 8, 16) or num_stages < 1:
        return f"num_warps={num_warps} / num_stages={num_stages} out of range"
    if bucket is not None:
        if block_m > max(16, bucket[0]):
            return f"BLOCK_M={block_m} > seqlen_q bucket {bucket[0]}"
        if block_n > max(16, bucket[1]):
            return f"BLOCK_N={block_n} > seqlen_k bucket {bucket[1]}"
    cc = spec["arch"]
    if cc == 0:
        return None
    limit = forward.smem_limit(cc)
    smem = forward.smem_bytes(spec, config)
    if smem > limit:
        return f"shared memory {smem // 1024} KB > {limit // 1024} KB"
    regs = regs_per_thread(spec, config)
    regs_limit = min(MAX_REGS_PER_THREAD, REGS_PER_BLOCK // (num_warps * 32))
    if regs > regs_limit:   # ptxas: "Insufficient registers" (seen at 256 x 32 x 16 warps, D=256, on an H100)
        return f"~{regs:.0f} registers per thread > {regs_limit} ({num_warps} warps)"
    if block_m < 8 * num_warps:
        return f"BLOCK_M={block_m} gives under 8 rows per warp with {num_warps} warps"
    if config.get("WARP_SPECIALIZE") and num_warps < 8:
        return "WARP_SPECIALIZE with 4 warps fails Triton 3.6's NVGPUWarpSpecialization pass"
    return None


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
                if is_feasible(spec, config, bucket) is None:
                    out.append(config)
                    break
    return out


def plan_buckets(spec: KernelSpec, interpret: bool) -> list[Bucket]:
    return list(INTERPRET_BUCKETS if interpret else GPU_BUCKETS)


def bucket_of(desc: dict[str, Any]) -> Bucket:
    return forward.shape_bucket(desc["batch"], desc["heads_q"], desc["seqlen_q"], desc["seqlen_k"])


def _heads(spec: KernelSpec, batch_heads: int, heads: int = HEADS) -> tuple[int, int]:
    group = spec["gqa_group"]
    heads_q = max(group, min(batch_heads, heads))
    heads_q -= heads_q % group
    return heads_q, max(1, batch_heads // heads_q)


def make_desc(spec: KernelSpec, seqlen_q: int, seqlen_k: int, batch: int, heads_q: int) -> dict[str, Any]:
    return {"batch": batch, "seqlen_q": seqlen_q, "seqlen_k": seqlen_k, "heads_q": heads_q,
            "heads_kv": heads_q // spec["gqa_group"], "head_dim": spec["head_dim"], "dtype": spec["dtype"],
            "causal": spec["causal"], "window": spec["window"], "softcap": spec["softcap"]}


def desc_for(spec: KernelSpec, bucket: Bucket) -> dict[str, Any]:
    """The shape tuned for a bucket: its upper corner (the bucket's largest, hence most work-bound, member)."""
    seqlen_q, seqlen_k, batch_heads = bucket
    heads_q, batch = _heads(spec, batch_heads)
    return make_desc(spec, seqlen_q, seqlen_k, batch, heads_q)


def heldout_descs(spec: KernelSpec, buckets: Sequence[Bucket]) -> list[dict[str, Any]]:
    """Shapes the plan did not tune: 3/4 of each bucket's sequence length (same bucket, off its corner) and the
    geometric midpoints between consecutive buckets (an untuned bucket: dispatch uses the nearest)."""
    out, seen = [], set()
    ordered = sorted(set(buckets), key=lambda b: (b[0] * b[1] * b[2], b))

    def add(seqlen_q, seqlen_k, batch_heads):
        heads_q, batch = _heads(spec, batch_heads)
        key = (seqlen_q, seqlen_k, batch, heads_q)
        if key not in seen:
            seen.add(key)
            out.append(make_desc(spec, seqlen_q, seqlen_k, batch, heads_q))

    quantum = 16 if spec["arch"] == 0 else 64
    for sq, sk, bh in ordered:
        add(max(quantum, sq * 3 // 4 // quantum * quantum), max(quantum, sk * 3 // 4 // quantum * quantum), bh)
    for (sq1, sk1, bh1), (sq2, sk2, bh2) in zip(ordered, ordered[1:]):
        def mid(a, b):
            return max(quantum, int(round(math.sqrt(a * b) / quantum)) * quantum)
        add(mid(sq1, sq2), mid(sk1, sk2), triton.next_power_of_2(int(math.sqrt(bh1 * bh2))))
    return out


def flops(desc: dict[str, Any]) -> float:
    return forward.flops(desc["batch"], desc["heads_q"], desc["seqlen_q"], desc["seqlen_k"], desc["head_dim"],
                         desc["causal"])


# ---------------------------------------------------------------------------------------------- reference

def reference(q, k, v, softmax_scale: float, causal: bool, compute_dtype=torch.float64):
    """Attention computed in `compute_dtype` (bottom-right causal alignment, GQA by head index)."""
    _, seqlen_q, heads_q, _ = q.shape
    seqlen_k, heads_kv = k.shape[1], k.shape[2]
    index = torch.arange(heads_q, device=q.device) // (heads_q // heads_kv)
    qc = q.to(compute_dtype).transpose(1, 2)
    kc = k.to(compute_dtype).transpose(1, 2)[:, index]
    vc = v.to(compute_dtype).transpose(1, 2)[:, index]
    scores = torch.matmul(qc, kc.transpose(-1, -2)) * softmax_scale
    if causal:
        pos = torch.arange(seqlen_q, device=q.device)[:, None] + (seqlen_k - seqlen_q)
        keep = torch.arange(seqlen_k, device=q.device)[None, :] <= pos
        scores = scores.masked_fill(~keep, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)       # rows that see no key: output 0
    return torch.matmul(probs, vc).transpose(1, 2)


_FLOOR = {"fp16": 2e-3, "bf16": 1.6e-2, "fp32": 2e-5}


def _check_shape(spec: KernelSpec, desc: dict[str, Any]) -> dict[str, Any]:
    """A smaller shape with the same integer specialization as `desc` (multiples of 16 stay multiples of 16,
    so the kernel compiled for timing is the one checked) whose lengths are not multiples of the tiles."""
    base = 48 if spec["arch"] == 0 else 336             # 16 * odd: partial BLOCK_M / BLOCK_N tiles
    sq, sk = desc["seqlen_q"], desc["seqlen_k"]

    def like(n, target):
        if n % 16 == 0:
            return target
        return target + n % 16
    if sq == sk:
        seqlen_q = seqlen_k = like(sq, base)
    elif sq < sk:
        seqlen_q, seqlen_k = like(sq, base), like(sk, 2 * base + 16)
    else:
        seqlen_q, seqlen_k = like(sq, 2 * base + 16), like(sk, base)
    heads_q = desc["heads_q"]
    if heads_q % 16 == 0:
        heads_q = 16 if spec["gqa_group"] <= 16 else heads_q
    check = dict(desc)
    check.update(batch=2, seqlen_q=seqlen_q, seqlen_k=seqlen_k, heads_q=heads_q,
                 heads_kv=heads_q // spec["gqa_group"])
    return check


def _inputs(desc: dict[str, Any], device: str, generator: torch.Generator | None = None):
    dtype = TORCH_DTYPES[desc["dtype"]]
    q = torch.randn(desc["batch"], desc["seqlen_q"], desc["heads_q"], desc["head_dim"], device=device,
                    dtype=dtype, generator=generator)
    k = torch.randn(desc["batch"], desc["seqlen_k"], desc["heads_kv"], desc["head_dim"], device=device,
                    dtype=dtype, generator=generator)
    v = torch.randn_like(k)
    return q, k, v


def _launch(q, k, v, desc, config):
    scale = desc["head_dim"] ** -0.5
    return forward.attention_forward(q, k, v, scale, desc["causal"], -1, 0 if desc["causal"] else -1, 0.0, False,
                                     config=config)[0]


def spec_for_desc(desc: dict[str, Any], arch: int) -> KernelSpec:
    return spec_for(arch, desc["dtype"], desc["head_dim"], desc.get("causal", False),
                    desc["heads_q"] // desc["heads_kv"], desc.get("window", False), desc.get("softcap", False))


def make_problem(spec: KernelSpec, desc: dict[str, Any], device: str) -> Problem:
    if desc.get("window") or desc.get("softcap"):
        raise NotImplementedError("the forward tuning problem covers causal / non-causal attention; window and "
                                  "softcap specs tune with their own problems (not yet)")
    q, k, v = _inputs(desc, device)
    runtime_spec = forward.make_spec(q, k, v, desc["causal"], False, False)
    set_bytes = sum(t.numel() * t.element_size() for t in (q, k, v, q))
    n_sets = 1
    if device != "cpu" and torch.cuda.is_available():
        l2 = getattr(torch.cuda.get_device_properties(torch.device(device)), "L2_cache_size", 50 << 20)
        n_sets = max(1, min(16, math.ceil(4 * l2 / set_bytes)))
    sets = [(q, k, v)] + [_inputs(desc, device) for _ in range(n_sets - 1)]

    def runner(config: Config):
        def run(i: int):
            qi, ki, vi = sets[i % n_sets]
            return _launch(qi, ki, vi, desc, config)
        return run

    check_desc = _check_shape(runtime_spec, desc)

    def check(config: Config) -> CheckResult:
        cq, ck, cv = _inputs(check_desc, device)
        out = _launch(cq, ck, cv, check_desc, config)
        scale = check_desc["head_dim"] ** -0.5
        exact = reference(cq, ck, cv, scale, check_desc["causal"], torch.float64)
        lowp = reference(cq, ck, cv, scale, check_desc["causal"], cq.dtype)
        torch_err = (lowp.double() - exact).abs().max().item()
        err = (out.double() - exact).abs().max().item()
        if not math.isfinite(err):
            err = math.inf
        tol = 3.0 * torch_err + _FLOOR[check_desc["dtype"]]
        return CheckResult(ok=err <= tol, error=err, tolerance=tol,
                           detail=f"checked on {check_desc['batch']}x{check_desc['seqlen_q']}x{check_desc['seqlen_k']}"
                                  f" heads {check_desc['heads_q']}/{check_desc['heads_kv']}")

    return Problem(spec=runtime_spec, desc=dict(desc), bucket=bucket_of(desc), work=flops(desc),
                   metric_unit="TFLOP/s", n_sets=n_sets, runner=runner, check=check, device=device)


TUNABLE = Tunable(
    template=TEMPLATE,
    bucket_names=("seqlen_q", "seqlen_k", "batch*heads"),
    metric_unit="TFLOP/s",
    plan_axes=dict(GPU_AXES),
    default_config=default_config,
    search_space=search_space,
    is_feasible=is_feasible,
    spec_for=spec_for,
    plan_buckets=plan_buckets,
    bucket_of=bucket_of,
    desc_for=desc_for,
    make_problem=make_problem,
    heldout_descs=heldout_descs,
    interpret_axes=dict(INTERPRET_AXES),
    spec_for_desc=spec_for_desc,
    initial_configs=initial_configs,
    runtime_default=forward.default_config,
)
