"""What the runtime knows of an op: its kernels, its call description, its shape buckets and its tunables.

An op is one user-visible computation (forward attention, split-KV decode) that runs one or more kernels. Its
`Op` declaration is everything dispatch, the tuning DB and the generic tools need, and nothing heavy: no torch
inputs, no Optuna, no benchmark code (the op's tuning and bench modules are named here and imported on demand).

Vocabulary
    call     an instance of the op's call-description dataclass: one concrete call's shape and options
    spec     KernelSpec: op + structural features (what the generated code depends on), from call + arch
    bucket   tuple of ints, one per `Axis`: the range of calls one tuned config serves. Axes read host-known
             integers of the call only (shapes, max_seqlen; never tensor values), so dispatch is CUDA-graph safe
    config   {tunable: int}. An op running several kernels namespaces them: "combine.num_warps"
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from ..generator import KernelSpec, spec_version

Config = dict[str, int]
Bucket = tuple[int, ...]


def next_pow2(n: int) -> int:
    return 1 << (max(int(n), 1) - 1).bit_length()


@dataclass(frozen=True)
class Axis:
    """One bucket coordinate: the product of some integer fields of the call, rounded up to a power of two
    (rounding="pow2") or kept as it is ("exact")."""
    name: str
    fields: tuple[str, ...]
    rounding: str = "pow2"

    def __post_init__(self):
        if self.rounding not in ("pow2", "exact"):
            raise ValueError(f"axis {self.name}: rounding must be 'pow2' or 'exact', got {self.rounding!r}")

    def round(self, value: int) -> int:
        return next_pow2(value) if self.rounding == "pow2" else int(value)

    def of(self, call: Any) -> int:
        return self.round(math.prod(getattr(call, f) for f in self.fields))


@dataclass(frozen=True)
class Param:
    """A launch-time tunable and every value it may take (the search space is a subset). `per_bucket`: its tuned
    value fits only its own bucket's shapes, so nearest-bucket dispatch takes the default's instead."""
    name: str
    values: tuple[int, ...]
    per_bucket: bool = False


@dataclass(frozen=True)
class Kernel:
    """A kernel of a multi-kernel op whose tunables do not interact with the other kernels' (the backward's dK/dV
    and dQ kernels: separate launches, separate tiles). The tuner searches each such kernel in a study of its own,
    in the order the op lists them, the tunables of the others held at the best config found so far, instead of one
    study over the product of every kernel's tunables. Its tunables are named "<name>.<tunable>" in configs."""
    name: str
    template: str                               # the template it renders (one of Op.kernels)
    tunables: tuple[Param, ...]


@dataclass(frozen=True)
class Op:
    name: str                                   # flashcore/ops/<name>/, the DB's `template` column
    kernels: tuple[str, ...]                    # templates it renders; their rendered source makes the version
    call_type: type                             # the call-description dataclass
    axes: tuple[Axis, ...]                      # shape bucket
    tunables: tuple[Param, ...]                 # every tunable and the values it may take
    default_config: Callable[[KernelSpec], Config]            # heuristic, always valid
    spec_of: Callable[[Any, int], KernelSpec]                 # (call, compute capability; 0 = interpreter)
    # Static feasibility beyond the declared values (shared memory, registers, tile vs bucket): None when the
    # config can run, else why not. Dispatch applies it to every record before use.
    is_feasible: Callable[[KernelSpec, Config, Bucket | None], str | None] = lambda spec, config, bucket: None
    tuning: str = ""            # "module:attribute" of the op's tuning declaration (tools only)
    bench: str = ""             # "module:attribute" of the op's benchmark suite (flashcore-bench only)
    metric_unit: str = "TFLOP/s"
    # Call fields `flashcore info` and `flashcore gen` fill in when the command line omits them
    cli_defaults: dict[str, Any] = field(default_factory=dict)
    # Host policy a record's config relies on, as text (attn_decode: the split heuristic num_splits=0 stands for):
    # part of every spec's version, so records made under another policy are stale
    host_policy: str = ""
    # Kernels tuned one study each, in this order (see Kernel); their tunables are `tunables`, all of them. Empty:
    # one study over `tunables`.
    tuned_kernels: tuple[Kernel, ...] = ()

    def __post_init__(self):
        if self.tuned_kernels:
            names = [t.name for kernel in self.tuned_kernels for t in kernel.tunables]
            if sorted(names) != sorted(t.name for t in self.tunables):
                raise ValueError(f"op {self.name}: the tuned kernels' tunables must be its tunables, each once")
            for kernel in self.tuned_kernels:
                if kernel.template not in self.kernels:
                    raise ValueError(f"op {self.name}: kernel {kernel.name} renders {kernel.template!r}, not one of "
                                     f"its templates {self.kernels}")
                stray = [t.name for t in kernel.tunables if not t.name.startswith(kernel.name + ".")]
                if stray:
                    raise ValueError(f"op {self.name}: kernel {kernel.name}'s tunables must be named "
                                     f"{kernel.name}.<tunable>, got {', '.join(stray)}")

    # ------------------------------------------------------------------------------------------- versions

    def version_of(self, spec: KernelSpec) -> str:
        """Hash of the source of every kernel the op renders for `spec`, and of its host policy: the version the
        spec's tuning records carry (their `template_hash`); a record of another version is stale. Of the code,
        not of the template text, so an edit of a shared macro that leaves this spec's code as it was keeps its
        records. Memoized per spec."""
        return spec_version(spec, self.kernels, self.host_policy)

    # ---------------------------------------------------------------------------------------------- calls

    def call_fields(self) -> list[dataclasses.Field]:
        return list(dataclasses.fields(self.call_type))

    # -------------------------------------------------------------------------------------------- buckets

    @property
    def bucket_names(self) -> tuple[str, ...]:
        return tuple(a.name for a in self.axes)

    def bucket_of(self, call: Any) -> Bucket:
        return tuple(a.of(call) for a in self.axes)

    def parse_bucket(self, text: str) -> Bucket:
        """'4096x4096x64' -> (4096, 4096, 64); each coordinate must be a value its axis can take."""
        try:
            bucket = tuple(int(x) for x in text.lower().split("x"))
        except ValueError:
            raise ValueError(f"bucket {text!r}: expected {'x'.join(self.bucket_names)} as integers") from None
        if len(bucket) != len(self.axes):
            raise ValueError(f"bucket {text!r}: {self.name} buckets have {len(self.axes)} coordinates "
                             f"({'x'.join(self.bucket_names)})")
        for axis, value in zip(self.axes, bucket):
            if value < 1 or axis.round(value) != value:
                raise ValueError(f"bucket {text!r}: {axis.name} must be a positive "
                                 f"{'power of two' if axis.rounding == 'pow2' else 'integer'}, got {value}")
        return bucket

    def bucket_distance(self, a: Bucket, b: Bucket) -> float:
        """L1 distance in log2 space: one step per doubling of any coordinate (dispatch's nearest bucket)."""
        if len(a) != len(b):
            return math.inf
        return sum(abs(math.log2(max(x, 1)) - math.log2(max(y, 1))) for x, y in zip(a, b))

    # -------------------------------------------------------------------------------------------- configs

    def check_config(self, spec: KernelSpec, config: Any, bucket: Bucket | None = None) -> str | None:
        """None if `config` can launch `spec` (on shapes of `bucket`), else why not: every tunable the default
        sets, nothing undeclared, each value one its tunable allows, and the op's static feasibility."""
        if not isinstance(config, dict):
            return f"config must be a dict of ints, got {type(config).__name__}"
        allowed = {t.name: t.values for t in self.tunables}
        missing = set(self.default_config(spec)) - set(config)
        if missing:
            return f"config lacks {', '.join(sorted(missing))}"
        for name, value in config.items():
            if name not in allowed:
                return f"{self.name} has no tunable {name!r}"
            if not isinstance(value, int) or isinstance(value, bool) or value not in allowed[name]:
                return f"{name}={value!r} is not one of {list(allowed[name])}"
        return self.is_feasible(spec, config, bucket)

    def from_neighbour(self, spec: KernelSpec, config: Config) -> Config:
        """A tuned record of another bucket as this bucket's config: its per-bucket tunables take the default's."""
        default = self.default_config(spec)
        return {**config, **{t.name: default[t.name] for t in self.tunables if t.per_bucket}}


_EXPECTED = {"bool": "true or false", "int": "an integer", "str": "a word"}   # call field type -> what to type


def parse_fields(op: Op, items: Sequence[str]) -> dict[str, Any]:
    """NAME=VALUE items (command lines) -> call fields, each typed by the op's call dataclass; unknown names and
    values of the wrong type are ValueErrors naming them (flashcore-tune heldout --shape)."""
    from ..generator import parse_feature_value
    fields = {f.name: f for f in op.call_fields()}
    values = {}
    for item in items:
        name, sep, text = item.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or name not in fields:
            raise ValueError(f"{item!r}: expected NAME=VALUE with NAME one of {', '.join(fields)}")
        value = parse_feature_value(text.strip())
        kind = fields[name].type if isinstance(fields[name].type, str) else fields[name].type.__name__
        if kind in _EXPECTED and type(value).__name__ != kind:     # (bool is not an int here)
            raise ValueError(f"{name}={text!r}: expected {_EXPECTED[kind]}")
        values[name] = value
    return values


def parse_call(op: Op, items: Sequence[str]) -> Any:
    """A call description from NAME=VALUE items (flashcore info, flashcore gen) over the op's cli_defaults."""
    values = {**op.cli_defaults, **parse_fields(op, items)}
    missing = [f.name for f in op.call_fields() if f.name not in values
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ValueError(f"{op.name} calls need {', '.join(missing)}")
    return op.call_type(**values)
