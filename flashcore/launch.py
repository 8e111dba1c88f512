"""Kernel launches by keyword, with Triton's per-call host work done once per call signature.

`kernel[grid](...)` redoes, on every call, work whose answer rarely changes: binding and specializing ~20
arguments, building the cache key, looking up the stream, validating tensor descriptors (about 45 us on an H100
host for the forward kernel; the launch itself is about 10 us). A `LaunchPlan` does that work on the first
call of a signature (through Triton's own path, so it compiles and specializes exactly as Triton would) and
keeps the compiled kernel with its fixed arguments. Each later call of the same signature passes only the
tensors that change. The caller owns the signature: it must cover every value Triton specializes on (shapes,
strides, scalars, 16-byte alignment of pointers), which is why plans are keyed by exact values.

Under the Triton interpreter, with launch hooks set (profilers), or if this Triton's compiled-kernel interface
is not the one expected, every call takes Triton's own path: slower, never wrong. The fast path reads Triton's
internals (the compiled launcher's argument order, its closure, descriptor objects built with `object.__new__`), so
it runs only on the Triton releases it was tested with on a GPU (FAST_LAUNCH_TRITON); on any other, kernels launch
through Triton's public `kernel[grid](...)`, with one warning per process.

What the ops share around their plans, so that each keeps them the same way:
    signature     the key of a call's plans: its tensors' shapes, strides, dtypes, devices and 16-byte alignment,
                  and its other arguments with their types
    KeptPlans     an op's plans by signature: bounded, and forgotten on dispatch.clear() (they hold its configs)
    Step          one kernel of a call that launches several (an op's plan holds a few): a LaunchPlan and which of
                  the call's tensors, by their index in the op's fixed order (its slots), fill its dynamic arguments
    launched_step a Step built from the kernel's parameters bound to slots, launched once as it is built
"""
from __future__ import annotations

from dataclasses import dataclass
from operator import itemgetter
from typing import Any, Callable, Hashable, Mapping, Sequence

import triton
from triton.tools.tensor_descriptor import TensorDescriptor

from . import dispatch
from .device import interpreter_mode

try:   # Triton >= 3.4
    from triton import knobs as _knobs
except ImportError:  # pragma: no cover - older Triton: launch hooks are not checked
    _knobs = None


# Triton releases (major.minor) whose compiled-launcher interface the fast path mirrors, tested on a GPU
FAST_LAUNCH_TRITON = ("3.6",)
_fast_launch: bool | None = None          # whether this process's Triton is one of them (decided on first use)


def fast_launch_known() -> bool:
    """Whether this Triton is one the fast path was tested with; on the first False, one warning."""
    global _fast_launch
    if _fast_launch is None:
        release = ".".join(triton.__version__.split(".")[:2])
        _fast_launch = release in FAST_LAUNCH_TRITON
        if not _fast_launch:
            import warnings
            warnings.warn(f"flashcore: Triton {triton.__version__} is not a release FlashCore's fast launch path was "
                          f"tested with ({', '.join(FAST_LAUNCH_TRITON)}): kernels launch through Triton's public "
                          "path (correct; more host time per call)", RuntimeWarning, stacklevel=3)
    return _fast_launch


def _hooks_set() -> bool:
    """A launch hook (a profiler) is installed. Triton 3.6 keeps hooks in always-present HookChain objects:
    empty chains count as unset. Read on every call (a profiler may come and go between two calls), in
    LaunchPlan.current_stream."""
    if _knobs is None:
        return False
    runtime = _knobs.runtime
    enter, leave = runtime.launch_enter_hook, runtime.launch_exit_hook
    return bool(getattr(enter, "calls", enter)) or bool(getattr(leave, "calls", leave))


def descriptor(t, block: Sequence[int]) -> TensorDescriptor:
    """A tile descriptor of `block` over the whole tensor, strides as they are (the attention kernels' TMA operands:
    dense (B, S, H, D), varlen's packed (total, H, D) or a paged cache)."""
    return TensorDescriptor(t, list(t.shape), list(t.stride()), list(block))


def _rebased(proto: TensorDescriptor, tensor) -> TensorDescriptor:
    """`proto` (a validated descriptor of the same shape, strides and block) over another tensor's memory.
    Skips __post_init__'s checks, which the plan's key already guarantees (alignment, strides)."""
    desc = object.__new__(TensorDescriptor)
    desc.__dict__.update(proto.__dict__)
    desc.base = tensor
    return desc


def _raw_launch(compiled, params, values: list, dynamic: Sequence[str], protos: dict[str, TensorDescriptor]):
    """Triton 3.6's CUDA launcher, called below its Python wrapper: the wrapper expands each tensor descriptor
    into (tensor map, shape, strides) and copies every argument, on every call (about 10 us for the forward
    kernel). Here the expansion is done once; a call fills the tensor maps of its own tensors and launches.

    Pointers go to the launcher as ints: given a tensor, it calls data_ptr() and asks the driver
    (cuPointerGetAttribute) whether the address is device memory, once per pointer and launch; given an int it takes
    the address as it is. The plan's key vouches for what that driver call checks (every tensor's device), and the
    first call of a signature went through Triton's own path, which checked each pointer. Static CUDA tensors
    (scratch buffers; the plan's `static` keeps them alive) become their addresses once; other static tensors
    (pinned host memory) stay objects, which the launcher maps to their device addresses.

    Returns launch(grid, stream, tensors), or None where this Triton's launcher is not the expected one (the caller
    then uses compiled.run, which is always right)."""
    try:
        from triton.backends.nvidia import driver as nvidia
        launcher = compiled.run
        if launcher.global_scratch_size or launcher.profile_scratch_size or not hasattr(launcher, "launch"):
            return None
        from triton.runtime import driver
        fill_tma = driver.active.utils.fill_tma_descriptor
        wrapped = launcher.launch      # the compiled launcher itself, or its tensor-descriptor wrapper (a closure)
        code = getattr(wrapped, "__code__", None)
        cells = dict(zip(code.co_freevars, (c.cell_contents for c in wrapped.__closure__ or ()))) if code else {}
        raw, metas = cells.get("launcher", wrapped), cells.get("tensordesc_meta") or []
        descs = [i for i, value in enumerate(values) if isinstance(value, TensorDescriptor)]
        if len(descs) != len(metas) or (descs and "launcher" not in cells):
            return None
        expanded, slots, fills = [], {}, {}
        for i, p in enumerate(params):
            if i not in descs:
                slots[p.name] = len(expanded)
                value = None if p.name in dynamic else values[i]        # keep no tensor of the first call
                expanded.append(value.data_ptr() if getattr(value, "is_cuda", False) else value)
                continue
            proto, meta = protos[p.name], metas[descs.index(i)]
            if meta is None or meta.get("fp4_padded"):
                return None
            shape, strides = list(proto.shape), list(proto.strides)
            if nvidia.make_tensordesc_arg(proto, meta)[1:] != [*shape, *strides]:
                return None          # another decomposition than the one mirrored here
            fills[p.name] = (meta["swizzle"], meta["elem_size"], nvidia.TMA_DTYPE_DEVICE_TO_HOST[meta["elem_type"]],
                             meta["block_size"], shape, strides, 1 if proto.padding == "nan" else 0)
            slots[p.name] = len(expanded)
            expanded += [None, *shape, *strides]
    except Exception:      # anything unexpected in Triton's internals: take the documented path
        return None
    base = (compiled.function, launcher.launch_cooperative_grid, launcher.launch_pdl, None, None,
            compiled.packed_metadata, None, None, None)
    plan = [(i, slots[n], fills.get(n)) for i, n in enumerate(dynamic)]
    # A tensor map here is a function of its base address alone (shape, strides, block and dtype are the plan's):
    # each descriptor keeps its last (address, map) for the next call at that address (a K/V cache used again,
    # an output the caching allocator hands back). A launch copies the map, so one map may serve many launches.
    last = [(None, None)] * len(plan)

    def launch(grid, stream, tensors):
        args = list(expanded)
        for (i, slot, fill), tensor in zip(plan, tensors):
            if fill is None:
                args[slot] = tensor.data_ptr()
                continue
            address = tensor.data_ptr()
            known, tensor_map = last[i]
            if known != address:
                tensor_map = fill_tma(address, *fill)
                last[i] = (address, tensor_map)
            args[slot] = tensor_map
        raw(*grid, stream, *base, *args)
    return launch


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
        self.static = {n: v for n, v in kwargs.items() if n not in self.dynamic}
        descs = {n: kwargs[n] for n in self.dynamic if isinstance(kwargs[n], TensorDescriptor)}
        # shape, strides and block of each descriptor, over no tensor: the plan keeps none of the call's tensors
        self.protos = {n: _rebased(d, None) for n, d in descs.items()}
        self.run = self.raw = None
        compiled = kernel[self.grid](**kwargs)   # Triton's own path: compiles and specializes on first use
        # a compiled kernel (not the interpreter's None, nor a future of an asynchronous compile) that exposes
        # the launcher as Triton 3.x does
        if (not interpreter_mode() and fast_launch_known()
                and all(hasattr(compiled, a) for a in ("run", "function", "packed_metadata"))):
            from triton.runtime import driver
            # the compiled launcher takes every parameter in declaration order, constexprs and defaults included
            names = [p.name for p in kernel.params]
            self.values = [None if p.name in self.dynamic else kwargs.get(p.name, p.default) for p in kernel.params]
            self.positions = tuple(names.index(n) for n in self.dynamic)
            self.get_device, self.get_stream = driver.active.get_current_device, driver.active.get_current_stream
            self.run = compiled.run          # loads the module on first access: `function` is set after it
            self.function, self.metadata = compiled.function, compiled.packed_metadata
            self.raw = _raw_launch(compiled, kernel.params, [kwargs.get(p.name, p.default) for p in kernel.params],
                                   self.dynamic, descs)

    def _args(self, tensors) -> list:
        return [tensor if (proto := self.protos.get(name)) is None else _rebased(proto, tensor)
                for name, tensor in zip(self.dynamic, tensors)]

    def current_stream(self):
        """The handle of the current CUDA stream (where a launch goes), or None where launches take Triton's own
        path (the interpreter, or a launch hook is set). A caller with several launches in a row reads it once
        and passes it to each `launch`."""
        return None if self.run is None or _hooks_set() else self.get_stream(self.get_device())

    def __call__(self, *tensors) -> None:
        """Launch on the current stream with the dynamic arguments, in `dynamic` order (plain tensors; descriptors
        are rebuilt)."""
        self.launch(self.current_stream(), tensors)

    def launch(self, stream, tensors) -> None:
        """Launch on `stream` (current_stream()'s answer; None: through Triton's own path) with the dynamic
        arguments, in `dynamic` order."""
        if stream is None or self.run is None:
            self.kernel[self.grid](**self.static, **dict(zip(self.dynamic, self._args(tensors))))
            return
        if self.raw is not None:
            self.raw(self.grid, stream, tensors)
            return
        values = list(self.values)
        for position, arg in zip(self.positions, self._args(tensors)):
            values[position] = arg
        gx, gy, gz = self.grid
        self.run(gx, gy, gz, stream, self.function, self.metadata, None, None, None, *values)


def signature(tensors: Sequence, options: tuple) -> tuple | None:
    """The key of a call's kept plans: what Triton specializes on (shapes, strides, dtypes, 16-byte alignment of
    pointers; the scalars among `options`) and the devices, for `tensors` (None entries stand as None) and
    `options` (the call's other arguments, hashable, with their types: True == 1 == 1.0 as keys). A caller whose
    checks run once per signature must put in it everything they read. None where an entry of `tensors` is not a
    tensor (the caller's checks say which)."""
    try:
        return (options, tuple(map(type, options)),
                *[t if t is None else (t.shape, t.stride(), t.dtype, t.device, t.data_ptr() % 16 == 0)
                  for t in tensors])
    except (AttributeError, TypeError):
        return None


MAX_PLANS = 4096      # signatures an op keeps by default: far more than a serving process calls with


class KeptPlans:
    """An op's plans by call signature. At most `bound`: a full cache starts over rather than grow without end (a
    process whose calls keep making new signatures). Forgotten on dispatch.clear(): a plan holds the config dispatch
    chose when it was built."""

    def __init__(self, bound: int = MAX_PLANS):
        self._plans: dict[Hashable, Any] = {}
        self.bound = bound
        # the dict's own methods: a lookup (the eager hot path) runs no Python code of this class
        self.get, self.values, self.clear = self._plans.get, self._plans.values, self._plans.clear
        dispatch.on_clear(self._plans.clear)

    def __len__(self) -> int:
        return len(self._plans)

    def put(self, key: Hashable, plan) -> None:
        if len(self._plans) >= self.bound:
            self._plans.clear()
        self._plans[key] = plan


def _picker(slots: tuple[int, ...]) -> Callable[[Sequence], tuple]:
    """tensors -> (tensors[i] for i in slots), as a tuple: itemgetter (one C call), except for one slot, where it
    would give the bare item."""
    if len(slots) >= 2:
        return itemgetter(*slots)
    return lambda tensors: tuple(tensors[i] for i in slots)


@dataclass
class Step:
    """A kept launch plan and `pick`, which takes from a call's tensors (in the op's slot order) those that fill its
    dynamic arguments, in their order."""
    plan: LaunchPlan
    pick: Callable[[Sequence], tuple]

    def __call__(self, tensors: Sequence, stream) -> None:
        """Launch on `stream` (the plan's current_stream(), read once for the call's launches) over `tensors`."""
        self.plan.launch(stream, self.pick(tensors))


def launched_step(kernel, grid: Sequence[int], bind: Mapping[str, int], tensors: Sequence,
                  descriptors: Mapping[str, Sequence[int]] | None = None, **scalars) -> Step:
    """The Step of `kernel` whose parameter p is tensors[bind[p]] (its slot) and whose other arguments are
    `scalars`, launched once on `tensors` as it is built (the first call of a signature runs through Triton). A slot
    that holds None passes None as a fixed argument (an absent optional tensor). `descriptors` maps parameters to
    a block shape: those take a tensor descriptor of that block over their whole tensor (the plan rebuilds it over
    each later call's tensor)."""
    dynamic = [(param, slot) for param, slot in bind.items() if tensors[slot] is not None]
    kwargs = {param: tensors[slot] for param, slot in bind.items()} | scalars
    for param, block in (descriptors or {}).items():
        kwargs[param] = descriptor(kwargs[param], block)
    return Step(LaunchPlan(kernel, grid, [param for param, _ in dynamic], kwargs),
                _picker(tuple(slot for _, slot in dynamic)))
