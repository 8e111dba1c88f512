"""attn_bwd's tuning declaration: search space, initial design, plan, benchmark problem.

Two studies per bucket (Op.tuned_kernels): the dK/dV kernel's tiles first, the dQ kernel's at their default; then
the dQ kernel's, the dK/dV kernel's held at the best found. Each: BLOCK_M x BLOCK_N x num_warps x num_stages,
categorical, pruned by the op's feasibility check (host.is_feasible: shared memory, tiles within the bucket). What
is timed is the whole backward (preprocess, dK/dV, dQ) of a forward run once outside timing, as autograd calls it.
A dq_atomic spec (the atomic-dQ scheme) runs no dQ kernel: its "dq" study searches the row tile and warps of the
preprocess and convert kernels only (dq.BLOCK_N and dq.num_stages held at the default's).

Buckets (the op's axes): (next_pow2(seqlen_q), next_pow2(seqlen_k), next_pow2(batch * heads_q)), attn_fwd's: the
GPU plan is its prefill buckets (a 512-token prompt, a batch of 2k sequences, an 8k context) over bf16 / fp16, head
dims 64 / 128 / 256, causal or not, MHA and GQA 8, both schemes (dq_atomic false and true: host.dq_atomic_for says
which one a call runs). The interpreter's plan tunes the atomic one (dq_atomic true), which has the more to check.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from ...counts import BACKWARD_FLOPS, nbytes
from ...dtypes import TORCH_DTYPES
from ...generator import KernelSpec
from ...models import TRAINING_SHAPES, ModelHeads
from ...reference import grad_errors
from ...tuning import CheckResult, Config, Problem, Tuning, input_sets
from ..attn_fwd import tuning as fwd_tuning
from ..attn_fwd.host import attention_forward
from ..base import Bucket
from . import OP
from .call import AttnBwdCall
from .host import ATOMIC_DQ_ARCHS, attention_backward, default_config, spec_of, uses_atomic_dq

GPU_AXES = dict(fwd_tuning.GPU_AXES, dq_atomic=(False, True))
GPU_BUCKETS = fwd_tuning.GPU_BUCKETS
INTERPRET_AXES = {"dtype": ("fp16",), "head_dim": (32,), "causal": (False, True), "gqa_group": (1,), "window": (False,),
                  "softcap": (False,), "dq_atomic": (True,)}
# what a dq_atomic spec's launches do not read: the dQ kernel's key tile and pipeline depth (it runs no dQ kernel)
UNUSED_BY_ATOMIC = ("dq.BLOCK_N", "dq.num_stages")
INTERPRET_BUCKETS: tuple[Bucket, ...] = ((32, 32, 2),)


def search_space(spec: KernelSpec, bucket: Bucket | None = None) -> dict[str, list[int]]:
    """Each kernel's tiles; the kept tile (dK/dV: BLOCK_N keys, dQ: BLOCK_M rows) and the swept one range alike. A
    dq_atomic spec's UNUSED_BY_ATOMIC tunables take the default's value only: its "dq" study searches the row tile
    and warps that its preprocess and convert kernels run on."""
    if spec["arch"] == 0:       # interpreter: num_warps / num_stages mean nothing there
        per_kernel = {"BLOCK_M": [16, 32], "BLOCK_N": [16, 32], "num_warps": [4], "num_stages": [1]}
    else:
        per_kernel = {"BLOCK_M": [16, 32, 64, 128], "BLOCK_N": [16, 32, 64, 128], "num_warps": [4, 8],
                      "num_stages": [1, 2, 3, 4]}
    space = {f"{kernel.name}.{name}": list(values) for kernel in OP.tuned_kernels
             for name, values in per_kernel.items()}
    default = default_config(spec)
    for name, value in default.items():    # the default is always a point of the space
        if value not in space[name]:
            space[name] = sorted(space[name] + [value])
    if uses_atomic_dq(spec):
        space.update({name: [default[name]] for name in UNUSED_BY_ATOMIC})
    return space


def initial_configs(spec: KernelSpec, bucket: Bucket | None) -> list[Config]:
    """Per kernel, the thin-swept-tile shapes (Triton's fused-attention tutorial: the kept tile 4x the swept one,
    then 2x and square) at 4 and 8 warps and 2 stages (a dq_atomic spec: the dQ tunables it does not read at the
    default's). Each kernel's study keeps its own part of these."""
    default = default_config(spec)
    shapes = ((32, 128), (64, 128), (64, 64), (32, 64), (16, 64))       # (swept, kept)
    out = []
    for swept, kept in shapes:
        for warps in (4, 8):
            config = dict(default)
            config.update({"dkdv.BLOCK_M": swept, "dkdv.BLOCK_N": kept, "dkdv.num_warps": warps,
                           "dkdv.num_stages": 2, "dq.BLOCK_M": kept, "dq.BLOCK_N": swept, "dq.num_warps": warps,
                           "dq.num_stages": 2})
            if uses_atomic_dq(spec):
                config.update({name: default[name] for name in UNUSED_BY_ATOMIC})
            if OP.check_config(spec, config, bucket) is None:
                out.append(config)
    return out


def plan_buckets(spec: KernelSpec, interpret: bool) -> list[Bucket]:
    return list(INTERPRET_BUCKETS if interpret else GPU_BUCKETS)


def call_for(features: dict[str, Any], coords: Sequence[int]) -> AttnBwdCall:
    """The forward call whose backward is tuned for (seqlen_q, seqlen_k, batch * heads): attn_fwd's, in the scheme
    of the features' dq_atomic."""
    return AttnBwdCall(**vars(fwd_tuning.call_for(features, coords)), dq_atomic=features.get("dq_atomic", False))


def model_calls(model: ModelHeads, dtype: str) -> list[AttnBwdCall]:
    """A model's training steps (models.TRAINING_SHAPES), causal, for each kind of its layers, in the scheme
    flash-attn's default (deterministic=False) runs on Hopper (host.dq_atomic_for: the lent cards are sm90)."""
    atomic = 90 in ATOMIC_DQ_ARCHS
    return [AttnBwdCall(batch, tokens, tokens, m.heads_q, m.heads_kv, m.head_dim, dtype, causal=True,
                        window=m.window > 0, softcap=m.softcap > 0, dq_atomic=atomic)
            for m in model.layers() for batch, tokens in TRAINING_SHAPES]


def _inputs(call: AttnBwdCall, device: str, seed: int | None = None):
    """q, k, v, dout and the forward's out, lse (the saved tensors the backward reads)."""
    gen = None if seed is None else torch.Generator(device).manual_seed(seed)
    dtype = TORCH_DTYPES[call.dtype]
    q = torch.randn(call.batch, call.seqlen_q, call.heads_q, call.head_dim, device=device, dtype=dtype, generator=gen)
    k = torch.randn(call.batch, call.seqlen_k, call.heads_kv, call.head_dim, device=device, dtype=dtype,
                    generator=gen)
    v = torch.randn(k.shape, device=device, dtype=dtype, generator=gen)
    dout = torch.randn(q.shape, device=device, dtype=dtype, generator=gen)
    options = fwd_tuning.attention_options(call)
    out, lse = attention_forward(q, k, v, call.head_dim ** -0.5, call.causal, *options["window_size"],
                                 options["softcap"], True)
    return q, k, v, dout, out, lse


def _launch(q, k, v, dout, out, lse, call: AttnBwdCall, config: Config):
    options = fwd_tuning.attention_options(call)
    return attention_backward(dout, q, k, v, out, lse, call.head_dim ** -0.5, call.causal, *options["window_size"],
                              options["softcap"], dq_atomic=call.dq_atomic, config=config)


def make_problem(spec: KernelSpec, call: AttnBwdCall, device: str) -> Problem:
    if call.alibi or call.varlen:
        raise NotImplementedError("the backward tuning problem covers dense attention (causal, window, softcap); "
                                  "ALiBi and varlen specs use the nearest record or the default (not yet tuned)")
    first = _inputs(call, device)
    runtime_spec = spec_of(call, spec["arch"])
    set_bytes = nbytes(*first)
    n_sets = input_sets(set_bytes, device)
    sets = [first] + [_inputs(call, device) for _ in range(n_sets - 1)]

    def runner(config: Config):
        def run(i: int):
            return _launch(*sets[i % n_sets], call, config)
        return run

    check_call = AttnBwdCall(**vars(fwd_tuning.partial_tile_call(runtime_spec, call)))

    def check(config: Config) -> CheckResult:
        q, k, v, dout, out, lse = _inputs(check_call, device, seed=0)
        grads = _launch(q, k, v, dout, out, lse, check_call, config)
        errors = grad_errors(grads, q, k, v, dout, **fwd_tuning.attention_options(check_call))
        name, err, tol = max(errors, key=lambda e: e[1] / e[2] if e[2] else 0.0)
        return CheckResult(ok=all(e <= t for _, e, t in errors), error=err, tolerance=tol,
                           detail=f"{name} checked on {check_call.describe()}")

    work = BACKWARD_FLOPS * fwd_tuning.flops_of(call)          # over the keys each row sees, as the forward's
    return Problem(spec=runtime_spec, call=call, bucket=OP.bucket_of(call), work=work,
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
