"""What an op declares to be tuned: the one interface between ops and the tuning loop (tools/).

The tuner, `flashcore-tune heldout / compare` and the reports know nothing about any particular kernel: they talk
to an op's `Tuning`, found through the op registry (`Op.tuning` names the module). Runtime dispatch never imports
this module: what it needs to validate a record (tunable names and values, feasibility, bucket distance) is in
the op's runtime declaration (flashcore/ops/base.py).

Vocabulary (see flashcore/ops/base.py for spec, bucket, config and call)
    plan     (spec, bucket) pairs: the cartesian product of the plan axes (features), each with its buckets
    problem  one benchmarkable call on a device: run a config, check it against the reference, count its work

This module imports nothing heavy (no optuna, no sqlite).
"""
from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from .generator import KernelSpec
from .ops import Op
from .ops.base import Bucket, Config


def config_key(config: Config) -> tuple[tuple[str, int], ...]:
    """Hashable, order-independent form of a config."""
    return tuple(sorted(config.items()))


@dataclass
class CheckResult:
    ok: bool
    error: float          # max abs error against the reference
    tolerance: float      # what was allowed (relative to what PyTorch itself loses in the dtype)
    detail: str = ""


@dataclass
class Problem:
    """One concrete call of an op on a device, ready to time and check.

    runner(config) returns fn(i) that launches the op once on input set i (0 <= i < n_sets): the timer
    rotates over the sets so that a small problem is not timed out of a warm L2 cache. check(config) runs the
    config on fresh random inputs (shapes chosen to hit partial tiles) against the float64 reference.
    """
    spec: KernelSpec                  # the spec the runtime derives for these inputs (keys the records)
    call: Any                         # the op's call description
    bucket: Bucket
    work: float                       # FLOPs (metric TFLOP/s) or bytes (metric GB/s) of one launch
    metric_unit: str
    n_sets: int
    runner: Callable[[Config], Callable[[int], Any]]
    check: Callable[[Config], CheckResult]
    device: str = "cuda"

    def metric(self, ms: float) -> float:
        if not ms or ms <= 0 or not math.isfinite(ms):
            return 0.0
        scale = 1e12 if self.metric_unit == "TFLOP/s" else 1e9
        return self.work / (ms * 1e-3) / scale


def input_sets(set_bytes: float, device: str) -> int:
    """How many input sets a Problem rotates over so that one pass touches 4x the GPU's L2 (small problems are not
    timed warm), at most 16; 1 on the CPU and for sets past that size."""
    if device == "cpu":
        return 1
    import torch
    if not torch.cuda.is_available():
        return 1
    l2 = getattr(torch.cuda.get_device_properties(torch.device(device)), "L2_cache_size", 50 << 20)
    return max(1, min(16, math.ceil(4 * l2 / set_bytes)))


@dataclass(frozen=True)
class Tuning:
    """An op's tuning declaration. Every callable is pure host code (no GPU needed unless noted)."""
    op: Op
    # Features the default plan sweeps. --dtypes / --head-dims / --feature override them; each combination is
    # turned into a call (with `call_for`) and the call into the spec the runtime builds (`op.spec_of`).
    plan_axes: dict[str, tuple[Any, ...]]
    # Categorical search space for (spec, bucket): {tunable name: [choices]}; holds the default's values.
    search_space: Callable[[KernelSpec, Bucket | None], dict[str, list[int]]]
    # Default buckets of the plan for a spec (interpret=True: tiny shapes the CPU interpreter can run).
    plan_buckets: Callable[[KernelSpec, bool], list[Bucket]]
    # (features, coordinates) -> the call tuned for a bucket: its upper corner (the largest, most work-bound,
    # member). Coordinates need not be bucket values: held-out shapes come through here too.
    call_for: Callable[[dict[str, Any], Sequence[int]], Any]
    # Builds inputs on `device` (GPU memory, or CPU tensors under the interpreter).
    make_problem: Callable[[KernelSpec, Any, str], Problem]
    # Plan axes under the CPU interpreter (--interpret): small head dims, dtypes the interpreter gets right.
    interpret_axes: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    # The first configs a study measures after the default (an initial design the sampler learns from, e.g. a
    # coarse grid over the dominant tunables); None: random startup proposals.
    initial_configs: Callable[[KernelSpec, Bucket], list[Config]] | None = None
    # Held-out shapes: bucket axes shrunk to 3/4 of the bucket (same bucket, off its corner), quantized to
    # `quantum(spec)`; the other axes keep the bucket's value. Midpoints between buckets move every axis.
    heldout_axes: tuple[str, ...] = ()
    quantum: Callable[[KernelSpec], int] = lambda spec: 1
    # The config as a call of the bucket launches it (e.g. a count 0 resolved to what the host picks, a tunable of
    # a kernel the call does not run set to 0): configs that launch alike are measured once. None: as written.
    launched_as: Callable[[KernelSpec, Bucket | None, Config], Config] | None = None
    # The calls a model (flashcore.models.ModelHeads) makes of this op in `dtype`: `--plan models` tunes their
    # (spec, bucket) pairs. None: the op has no models plan yet.
    model_calls: Callable[[Any, str], list[Any]] | None = None

    @property
    def name(self) -> str:
        return self.op.name

    def stages(self) -> list[tuple[str, tuple[str, ...]]]:
        """(kernel, tunable names) of the studies a bucket is tuned in, in order: one per kernel the op tunes
        separately (Op.tuned_kernels), else one study ("") of every tunable."""
        if self.op.tuned_kernels:
            return [(k.name, tuple(t.name for t in k.tunables)) for k in self.op.tuned_kernels]
        return [("", tuple(t.name for t in self.op.tunables))]

    def stage_view(self, names: Sequence[str], base: Config) -> "Tuning":
        """This declaration searching the tunables `names` only, every other tunable held at its value in `base`,
        which is also the view's default (a kernel's study, after the kernels before it were tuned)."""
        names, base = frozenset(names), dict(base)
        full_space, full_initial = self.search_space, self.initial_configs

        def search_space(spec: KernelSpec, bucket: Bucket | None = None) -> dict[str, list[int]]:
            return {n: (list(choices) if n in names else [base[n]])
                    for n, choices in full_space(spec, bucket).items()}

        def initial_configs(spec: KernelSpec, bucket: Bucket | None) -> list[Config]:
            return [self.project(config, names, base) for config in full_initial(spec, bucket)]

        op = dataclasses.replace(self.op, default_config=lambda spec: dict(base))
        return dataclasses.replace(self, op=op, search_space=search_space,
                                   initial_configs=initial_configs if full_initial else None)

    def study_sizes(self, spec: KernelSpec, bucket: Bucket | None) -> list[int]:
        """Feasible configs of each study of a bucket (stages), the later kernels' counted around the default."""
        stages = self.stages()
        if len(stages) == 1:
            return [len(self.feasible_configs(spec, bucket))]
        default = self.op.default_config(spec)
        return [len(self.stage_view(names, default).feasible_configs(spec, bucket)) for _, names in stages]

    @staticmethod
    def project(config: Config, names: Sequence[str], base: Config) -> Config:
        """`config`'s values of the tunables `names`, `base`'s of the others."""
        return {**base, **{n: config[n] for n in names if n in config}}

    def features_of(self, spec: KernelSpec) -> dict[str, Any]:
        """The plan-axis values of a spec (what `call_for` needs to rebuild its calls)."""
        return {k: v for k, v in spec.features if k in self.plan_axes or k in self.interpret_axes}

    def call_of_bucket(self, spec: KernelSpec, coords: Sequence[int]):
        return self.call_for(self.features_of(spec), coords)

    def launch_key(self, spec: KernelSpec, bucket: Bucket | None, config: Config) -> tuple[tuple[str, int], ...]:
        """config_key of the config as the bucket's call launches it (`launched_as`): equal keys, same launches."""
        return config_key(self.launched_as(spec, bucket, config) if self.launched_as else config)

    def feasible_configs(self, spec: KernelSpec, bucket: Bucket | None) -> list[Config]:
        """Every config of the search space that passes the op's checks, one per launched form, the default first."""
        space = self.search_space(spec, bucket)
        names = list(space)
        default = dict(self.op.default_config(spec))
        out, seen = [default], {self.launch_key(spec, bucket, default)}
        for values in itertools.product(*(space[n] for n in names)):
            config = dict(zip(names, values))
            key = self.launch_key(spec, bucket, config)
            if key not in seen and self.op.check_config(spec, config, bucket) is None:
                seen.add(key)
                out.append(config)
        return out

    def axes(self, interpret: bool) -> dict[str, tuple[Any, ...]]:
        """The plan axes (feature -> values swept by default): the interpreter's own, if the op declares them."""
        return dict(self.interpret_axes if interpret and self.interpret_axes else self.plan_axes)

    def plan(self, arch: int, interpret: bool, axes: dict[str, Sequence[Any]] | None = None,
             buckets: Sequence[Bucket] | None = None) -> list[tuple[KernelSpec, Bucket]]:
        """(spec, bucket) pairs: the cartesian product of the plan axes, each with its buckets."""
        values = self.axes(interpret)
        unknown = set(axes or {}) - set(values)
        if unknown:
            raise ValueError(f"{self.name} has no plan axis {', '.join(sorted(unknown))}; axes: "
                             f"{', '.join(values)}")
        values.update(axes or {})
        names = list(values)
        items: list[tuple[KernelSpec, Bucket]] = []
        for combo in itertools.product(*(values[n] for n in names)):
            features = dict(zip(names, combo))
            probe = self.call_for(features, (1,) * len(self.op.axes))
            spec = self.op.spec_of(probe, arch)
            for bucket in (buckets if buckets else self.plan_buckets(spec, interpret)):
                items.append((spec, tuple(bucket)))
        return items

    def model_plan(self, arch: int, dtypes: Sequence[str]) -> list[tuple[KernelSpec, Bucket]]:
        """(spec, bucket) pairs of the calls flashcore.models.MODELS make of this op, each once, in model order."""
        from .models import MODELS
        items: dict[tuple[KernelSpec, Bucket], None] = {}
        for model in MODELS:
            for dtype in dtypes:
                for call in self.model_calls(model, dtype):
                    items[(self.op.spec_of(call, arch), self.op.bucket_of(call))] = None
        return list(items)

    def heldout_calls(self, spec: KernelSpec, buckets: Sequence[Bucket]) -> list[Any]:
        """Calls the plan did not tune: each bucket's `heldout_axes` at 3/4 (same bucket, off its corner) and
        the geometric midpoints between consecutive buckets (an untuned bucket: dispatch uses the nearest)."""
        names = self.op.bucket_names
        q = self.quantum(spec)
        shrink = [n in self.heldout_axes for n in names]
        ordered = sorted(set(buckets), key=lambda b: (math.prod(b), b))
        points = [tuple(max(q, c * 3 // 4 // q * q) if s else c for c, s in zip(b, shrink)) for b in ordered]
        points += [tuple(_midpoint(x, y, q if s else 1) for x, y, s in zip(a, b, shrink))
                   for a, b in zip(ordered, ordered[1:])]
        out, seen = [], set()
        for point in points:
            call = self.call_of_bucket(spec, point)
            if call not in seen:
                seen.add(call)
                out.append(call)
        return out


def _midpoint(a: int, b: int, quantum: int) -> int:
    """Geometric midpoint of two bucket coordinates, a multiple of `quantum`."""
    return max(quantum, int(round(math.sqrt(a * b) / quantum)) * quantum)


# GPU names (flashcore.device.gpu_name) -> compute capability, for planning on another machine.
GPU_ARCH = {"h100": 90, "h200": 90, "h800": 90, "gh200": 90, "b200": 100, "a100": 80, "a800": 80, "l40s": 89,
            "l4": 89, "rtx4090": 89, "interpreter": 0}


def tuning_of(op_name: str) -> Tuning:
    """The tuning declaration of a registered op (imports its tuning module)."""
    from . import ops
    op = ops.get(op_name)
    if not op.tuning:
        raise KeyError(f"op {op_name!r} declares no tuning")
    return ops.resolve(op.tuning)
