"""The op registry: op name -> the module that declares it (its `OP`). One line per op.

Dispatch, the tuning DB, the tuner and the CLIs reach ops only through here; an op's module is imported on
first use, so `import flashcore` stays cheap. Ops defined elsewhere (tests, out-of-tree kernels) call
`register(op)` from a module named in $FLASHCORE_OPS (comma separated module names), which every process
imports on first use of the registry: the tools' worker processes see them too.
"""
from __future__ import annotations

import importlib
import os

import jinja2

from ..generator import KernelSpec
from .base import Axis, Bucket, Config, Kernel, Op, Param, next_pow2, parse_call, parse_fields

REGISTRY: dict[str, str] = {
    "attn_fwd": "flashcore.ops.attn_fwd",
    "attn_decode": "flashcore.ops.attn_decode",
    "attn_varlen": "flashcore.ops.attn_varlen",
    "attn_bwd": "flashcore.ops.attn_bwd",
}
_loaded: dict[str, Op] = {}


def register(op: Op) -> Op:
    """Make `op` known to dispatch and the tools (ops that live outside flashcore/ops/)."""
    _loaded[op.name] = op
    REGISTRY.setdefault(op.name, "")
    return op


def _import_plugins() -> None:
    for module in filter(None, (m.strip() for m in os.environ.get("FLASHCORE_OPS", "").split(","))):
        if module not in _plugins:
            _plugins.add(module)
            importlib.import_module(module)


_plugins: set[str] = set()


def get(name: str) -> Op:
    _import_plugins()
    op = _loaded.get(name)
    if op is None:
        module = REGISTRY.get(name)
        if not module:
            raise KeyError(f"no op {name!r}; known: {', '.join(sorted(REGISTRY))}")
        op = _loaded[name] = importlib.import_module(module).OP
    return op


def names() -> list[str]:
    _import_plugins()
    return sorted(REGISTRY)


def current_version(name: str, spec_key: str) -> str | None:
    """The version a record of op `name` for the spec `spec_key` (KernelSpec.key()) must carry to be used
    (Op.version_of); None where this flashcore cannot render that spec (an unknown op or feature): such records
    are stale."""
    try:
        return get(name).version_of(KernelSpec.from_key(spec_key))
    except (KeyError, ValueError, TypeError, jinja2.TemplateError):
        return None


def resolve(target: str):
    """'module:attribute' -> the attribute (an op's tuning declaration or bench suite)."""
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


__all__ = ["Axis", "Bucket", "Config", "Op", "Param", "REGISTRY", "current_version", "get", "names", "next_pow2",
           "parse_call", "parse_fields", "register", "resolve"]
