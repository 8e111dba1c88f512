"""Which tile config runs for a (spec, shape bucket): the one place the tuning DB plugs into.

The first call for a (spec, bucket) resolves a config; every later call is a dict lookup.
"""
from __future__ import annotations

from typing import Callable

from .generator import KernelSpec

Config = dict[str, int]
_memo: dict[tuple[KernelSpec, tuple[int, ...]], Config] = {}


def config_for(spec: KernelSpec, bucket: tuple[int, ...], default: Callable[[KernelSpec], Config]) -> Config:
    """The config to launch `spec` with on shapes in `bucket` (memoized)."""
    config = _memo.get((spec, bucket))
    if config is None:
        config = _memo[(spec, bucket)] = dict(default(spec))
    return config


def clear() -> None:
    """Forget resolved configs (after the tuning DB changed)."""
    _memo.clear()
