"""What a kernel template declares to be tuned: the one interface between templates and the tuning loop.

The tuner (tools/tune.py), the tuning DB (tuning_db/) and runtime dispatch (flashcore/dispatch.py) know nothing
about any particular kernel: they talk to a `Tunable`, looked up by template name in `REGISTRY`. A new template
(split-KV decode, varlen / paged prefill, backward) plugs in by writing one module that builds a `Tunable` --
its search space, static pruning, shape buckets, default heuristic, plan and benchmark problem -- and adding
one line to `REGISTRY`. Nothing in the tuner, the DB or dispatch changes.

Vocabulary
    spec     KernelSpec: template + structural features (what the generated code depends on)
    bucket   tuple of ints: the range of call shapes one tuned config serves (forward: next_pow2 of
             seqlen_q, seqlen_k, batch*heads). Dispatch finds the nearest tuned bucket by `bucket_distance`.
    desc     dict describing one concrete call: its shape plus the call options that pick features
             (forward: batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim, dtype, causal, ...)
    config   dict of launch-time tunables ({BLOCK_M, BLOCK_N, num_warps, num_stages, ...}), ints
    problem  one benchmarkable call on a device: run a config, check it against a reference, count its work

This module imports nothing heavy (no optuna, no sqlite): `import flashcore` stays cheap.
"""
from __future__ import annotations

import importlib
import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from .generator import KernelSpec

Config = dict[str, int]
Bucket = tuple[int, ...]


def config_key(config: Config) -> tuple[tuple[str, int], ...]:
    """Hashable, order-independent form of a config."""
    return tuple(sorted(config.items()))


def log2_distance(a: Bucket, b: Bucket) -> float:
    """L1 distance between buckets in log2 space: one step per doubling of any bucket coordinate."""
    if len(a) != len(b):
        return math.inf
    return sum(abs(math.log2(max(x, 1)) - math.log2(max(y, 1))) for x, y in zip(a, b))


@dataclass
class CheckResult:
    ok: bool
    error: float          # max abs error against the reference
    tolerance: float      # what was allowed (relative to what PyTorch itself loses in the dtype)
    detail: str = ""


@dataclass
class Problem:
    """One concrete call of a template on a device, ready to time and check.

    runner(config) returns fn(i) that launches the kernel once on input set i (0 <= i < n_sets): the timer
    rotates over the sets so that a small problem is not timed out of a warm L2 cache. check(config) runs the
    config on fresh random inputs (shapes chosen to hit partial tiles) against a high-precision reference.
    """
    spec: KernelSpec                  # the spec the runtime derives for these inputs (keys the records)
    desc: dict[str, Any]
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


@dataclass(frozen=True)
class Tunable:
    """A template's tuning declaration. Every callable is pure host code (no GPU needed unless noted)."""
    template: str
    bucket_names: tuple[str, ...]                 # names of the bucket coordinates (reports, `flashcore info`)
    metric_unit: str                              # "TFLOP/s" or "GB/s"
    # Features the default plan sweeps, with their default values. --dtypes / --head-dims / --feature
    # override them; they are passed as keyword arguments to `spec_for`.
    plan_axes: dict[str, tuple[Any, ...]]
    default_config: Callable[[KernelSpec], Config]
    # Categorical search space for (spec, bucket): {tunable name: [choices]}; always contains the default's values.
    search_space: Callable[[KernelSpec, Bucket], dict[str, list[int]]]
    # Static pruning before anything compiles: None when the config can run, else the reason it cannot.
    is_feasible: Callable[[KernelSpec, Config, Bucket | None], str | None]
    # The spec the runtime would build on a GPU of compute capability `arch` for a call with these features.
    spec_for: Callable[..., KernelSpec]
    # Default buckets of the plan for a spec (interpret=True: tiny shapes the CPU interpreter can run).
    plan_buckets: Callable[[KernelSpec, bool], list[Bucket]]
    bucket_of: Callable[[dict[str, Any]], Bucket]                 # desc -> bucket (what dispatch keys on)
    desc_for: Callable[[KernelSpec, Bucket], dict[str, Any]]      # bucket -> the shape tuned for it
    # Builds inputs on `device` (GPU memory, or CPU tensors under the interpreter).
    make_problem: Callable[[KernelSpec, dict[str, Any], str], Problem]
    # Shapes between the plan's buckets, for the held-out evaluation.
    heldout_descs: Callable[[KernelSpec, Sequence[Bucket]], list[dict[str, Any]]]
    # Parses a bucket from the command line ("4096x4096x64"); the default splits on 'x'.
    parse_bucket: Callable[[str], Bucket] = field(default=lambda text: tuple(int(x) for x in text.lower().split("x")))
    bucket_distance: Callable[[Bucket, Bucket], float] = log2_distance
    # Plan axes under the CPU interpreter (--interpret): small head dims, dtypes the interpreter gets right.
    interpret_axes: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    # The first configs a study measures after the default (an initial design the sampler learns from, e.g. a
    # coarse grid over the dominant tunables); None: random startup proposals.
    initial_configs: Callable[[KernelSpec, Bucket], list[Config]] | None = None
    # The default the runtime hands dispatch.config_for (when it differs from default_config, e.g. leaves out
    # tunables the kernel gives a default); `flashcore info` explains lookups with it.
    runtime_default: Callable[[KernelSpec], Config] | None = None
    # desc + compute capability -> the spec the runtime builds for that call (`flashcore info`).
    spec_for_desc: Callable[[dict[str, Any], int], KernelSpec] | None = None

    def config_names(self, spec: KernelSpec) -> set[str]:
        """Every tunable a config of `spec` may set."""
        return set(self.default_config(spec)) | set(self.search_space(spec, None))

    def feasible_configs(self, spec: KernelSpec, bucket: Bucket | None) -> list[Config]:
        """Every config of the search space that passes static pruning, the default first."""
        space = self.search_space(spec, bucket)
        names = list(space)
        default = dict(self.default_config(spec))
        out, seen = [default], {config_key(default)}
        for values in itertools.product(*(space[n] for n in names)):
            config = dict(zip(names, values))
            if config_key(config) not in seen and self.is_feasible(spec, config, bucket) is None:
                seen.add(config_key(config))
                out.append(config)
        return out

    def plan(self, arch: int, interpret: bool, axes: dict[str, Sequence[Any]] | None = None,
             buckets: Sequence[Bucket] | None = None) -> list[tuple[KernelSpec, Bucket]]:
        """(spec, bucket) pairs: the cartesian product of the plan axes, each with its buckets."""
        values = dict(self.interpret_axes if interpret and self.interpret_axes else self.plan_axes)
        values.update(axes or {})
        names = list(values)
        items: list[tuple[KernelSpec, Bucket]] = []
        for combo in itertools.product(*(values[n] for n in names)):
            spec = self.spec_for(arch=arch, **dict(zip(names, combo)))
            for bucket in (buckets if buckets else self.plan_buckets(spec, interpret)):
                items.append((spec, tuple(bucket)))
        return items


# GPU names (flashcore.device.gpu_name) -> compute capability, for planning on another machine.
GPU_ARCH = {"h100": 90, "h200": 90, "h800": 90, "gh200": 90, "b200": 100, "a100": 80, "a800": 80, "l40s": 89,
            "l4": 89, "rtx4090": 89, "interpreter": 0}

# Template name -> "module:attribute" of its Tunable, imported on first use (a template's tuning module may
# import torch and its host code; dispatch never needs it).
REGISTRY: dict[str, str] = {
    "attn_fwd": "flashcore.forward_tuning:TUNABLE",
}
_loaded: dict[str, Tunable] = {}


def register(tunable: Tunable) -> None:
    """Register a Tunable at runtime (tests, out-of-tree templates)."""
    _loaded[tunable.template] = tunable
    REGISTRY.setdefault(tunable.template, "")


def get(template: str) -> Tunable:
    tunable = _loaded.get(template)
    if tunable is None:
        target = REGISTRY.get(template)
        if not target:
            raise KeyError(f"no tunable template {template!r}; known: {', '.join(sorted(REGISTRY))}")
        module_name, _, attr = target.partition(":")
        tunable = _loaded[template] = getattr(importlib.import_module(module_name), attr)
    return tunable


def names() -> list[str]:
    return sorted(REGISTRY)
