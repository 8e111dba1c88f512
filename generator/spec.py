"""KernelSpec: which op, with which structural features.

A feature is anything that changes the *code* of a kernel (causal loop split, window bounds, softcap, TMA
loads, a head_dim constant). Values that only change numbers are launch arguments, and tile sizes are configs
chosen by dispatch. An op may render several kernels (split-KV decode + combine): they all share the op's spec.
The spec is hashable, so it keys the kernel memo, the tuning DB and dispatch's memo.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class KernelSpec:
    op: str                                  # name of the op (flashcore/ops/<op>/)
    features: tuple[tuple[str, Any], ...]    # sorted (name, value) pairs; values are bool / int / str

    @classmethod
    def make(cls, op: str, **features: Any) -> "KernelSpec":
        for name, value in features.items():
            if not isinstance(value, (bool, int, str)):
                raise TypeError(f"feature {name!r} must be bool, int or str, got {type(value).__name__}")
        return cls(op, tuple(sorted(features.items())))

    def __getitem__(self, name: str) -> Any:
        for key, value in self.features:
            if key == name:
                return value
        raise KeyError(name)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.features)

    def key(self) -> str:
        """Canonical text form, stable across processes (used in file names and DB rows)."""
        return json.dumps({"op": self.op, **self.as_dict()}, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_key(cls, key: str) -> "KernelSpec":
        fields = json.loads(key)
        return cls.make(fields.pop("op"), **fields)

    def __str__(self) -> str:
        return f"{self.op}(" + ", ".join(f"{k}={v}" for k, v in self.features) + ")"


def parse_feature_value(text: str) -> bool | int | str:
    """A feature value as typed on a command line: true/false, an int, or a string."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        return int(text)
    except ValueError:
        return text
