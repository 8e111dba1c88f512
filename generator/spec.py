"""KernelSpec: which template, with which structural features.

A feature is anything that changes the *code* of a kernel (causal loop split, window bounds, softcap, TMA
loads, a head_dim constant). Values that only change numbers are launch arguments, and tile sizes are configs
chosen by dispatch. The spec is hashable, so it keys the kernel memo, the tuning DB and dispatch's memo.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class KernelSpec:
    template: str                            # name of templates/<template>.py.jinja
    features: tuple[tuple[str, Any], ...]    # sorted (name, value) pairs; values are bool / int / str

    @classmethod
    def make(cls, template: str, **features: Any) -> "KernelSpec":
        for name, value in features.items():
            if not isinstance(value, (bool, int, str)):
                raise TypeError(f"feature {name!r} must be bool, int or str, got {type(value).__name__}")
        return cls(template, tuple(sorted(features.items())))

    def __getitem__(self, name: str) -> Any:
        for key, value in self.features:
            if key == name:
                return value
        raise KeyError(name)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.features)

    def key(self) -> str:
        """Canonical text form, stable across processes (used in file names and DB rows)."""
        return json.dumps({"template": self.template, **self.as_dict()}, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_key(cls, key: str) -> "KernelSpec":
        fields = json.loads(key)
        return cls.make(fields.pop("template"), **fields)

    def __str__(self) -> str:
        return f"{self.template}(" + ", ".join(f"{k}={v}" for k, v in self.features) + ")"


def parse_feature_value(text: str) -> bool | int | str:
    """A feature value as typed on a command line: true/false, an int, or a string."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        return int(text)
    except ValueError:
        return text
