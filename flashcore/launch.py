"""Kernel launches by keyword, with Triton's per-call host work done once per call signature.

`kernel[grid](...)` redoes, on every call, work whose answer rarely changes: binding and specializing ~20
arguments, building the cache key, looking up the stream, validating tensor descriptors (about 45 us on an H100
host for the forward kernel; the launch itself is about 10 us). A `LaunchPlan` does that work on the first
call of a signature (through Triton's own path, so it compiles and specializes exactly as Triton would) and
keeps the compiled kernel with its fixed arguments. Each later call of the same signature passes only the
tensors that change. The caller owns the signature: it must cover every value Triton specializes on (shapes,
strides, scalars, 16-byte alignment of pointers), which is why plans are keyed by exact values.

Under the Triton interpreter, with launch hooks set (profilers), or if this Triton's compiled-kernel interface
is not the one expected, every call takes Triton's own path: slower, never wrong.
"""
from __future__ import annotations

from typing import Any, Sequence

from triton.tools.tensor_descriptor import TensorDescriptor

from .device import interpreter_mode

try:   # Triton >= 3.4
    from triton import knobs as _knobs
except ImportError:  # pragma: no cover - older Triton: launch hooks are not checked
    _knobs = None


def _hooks_set() -> bool:
    return _knobs is not None and (_knobs.runtime.launch_enter_hook is not None
                                   or _knobs.runtime.launch_exit_hook is not None)


def _rebased(proto: TensorDescriptor, tensor) -> TensorDescriptor:
    """`proto` (a validated descriptor of the same shape, strides and block) over another tensor's memory.
    Skips __post_init__'s checks, which the plan's key already guarantees (alignment, strides)."""
    desc = object.__new__(TensorDescriptor)
    desc.__dict__.update(proto.__dict__)
    desc.base = tensor
    return desc


class LaunchPlan:
    """One kernel, one grid and every argument except the `dynamic` ones (the tensors of the call).

    Built from keyword arguments (the template's parameter names, plus num_warps / num_stages); `dynamic` names
    the tensor arguments that differ between calls of the same signature. A dynamic argument given as a
    TensorDescriptor on the first call is rebuilt over the new tensor on later ones (same shape, strides, block).
    """

    def __init__(self, kernel, grid: Sequence[int], dynamic: Sequence[str], kwargs: dict[str, Any]):
        self.kernel = kernel
        self.grid = tuple(grid) + (1,) * (3 - len(grid))
        self.dynamic = tuple(dynamic)
        self.static = {n: v for n, v in kwargs.items() if n not in self.dynamic}   # no tensor is kept alive
        self.protos = {n: kwargs[n] for n in self.dynamic if isinstance(kwargs[n], TensorDescriptor)}
        self.run = None
        compiled = kernel[self.grid](**kwargs)   # Triton's own path: compiles and specializes on first use
        # a compiled kernel (not the interpreter's None, nor a future of an asynchronous compile) that exposes
        # the launcher as Triton 3.x does
        if not interpreter_mode() and all(hasattr(compiled, a) for a in ("run", "function", "packed_metadata")):
            from triton.runtime import driver
            # the compiled launcher takes every parameter in declaration order, constexprs and defaults included
            names = [p.name for p in kernel.params]
            self.values = [None if p.name in self.dynamic else kwargs.get(p.name, p.default) for p in kernel.params]
            self.positions = tuple(names.index(n) for n in self.dynamic)
            self.driver = driver.active
            self.run = compiled.run          # loads the module on first access: `function` is set after it
            self.function, self.metadata = compiled.function, compiled.packed_metadata

    def _args(self, tensors) -> list:
        return [tensor if (proto := self.protos.get(name)) is None else _rebased(proto, tensor)
                for name, tensor in zip(self.dynamic, tensors)]

    def __call__(self, *tensors) -> None:
        """Launch with the dynamic arguments, in `dynamic` order (plain tensors; descriptors are rebuilt)."""
        if self.run is None or _hooks_set():
            self.kernel[self.grid](**self.static, **dict(zip(self.dynamic, self._args(tensors))))
            return
        values = list(self.values)
        for position, arg in zip(self.positions, self._args(tensors)):
            values[position] = arg
        device = self.driver.get_current_device()
        gx, gy, gz = self.grid
        self.run(gx, gy, gz, self.driver.get_current_stream(device), self.function, self.metadata, None, None, None,
                 *values)
