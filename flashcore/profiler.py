"""flashcore.profile(): what each FlashCore call ran, why, and what it cost, for a process in production.

    with flashcore.profile() as p:
        model.generate(...)
    print(p.summary())                 # per call: op, shape, kernel variant, config, the rule that chose it, device
    json.dump(p.to_json(), f)          # time, FLOPs, bytes, TFLOP/s, GB/s; then totals per op

While a profile is open, each call of a FlashCore op (forward, varlen, KV-cache, backward; eager, under
torch.compile or in training) is timed on its stream between two CUDA events (on the CPU, the interpreter's wall
time) and described: its kernel spec, the config its plan launched with and how dispatch chose it (user DB, bundle,
nearest bucket, default). The sequence lengths a call's counts need are copied on the device, not read: profiling
adds no host sync to a call. The events are read when the profile closes (one synchronize). The time between the
events is the stream's: where the GPU waits for the host inside the call (a signature's first call builds its
plan; a small call on an idle GPU waits for its own launch), that wait is counted too. A CUDA-graph replay
runs no host code and is not seen; calls made while a graph is captured are not recorded.

Without an open profile an op pays one read of a module global per call (ACTIVE). One profile per process: it
records the calls of every thread, except a call another thread makes while one is being timed (the profile steps
aside for the timed call).

Counts (exact for the call's own lengths, not the peers' causal-halving convention):
    FLOPs  4 * Hq * D per (query row, key it attends) pair: two matmuls of 2 * D each; masks (causal bottom-right,
           window) are counted per row. The backward is 2.5x its forward (five matmuls to two).
    bytes  the least HBM traffic the call needs: each tensor it reads once, each it writes once. A paged or KV cache
           counts only the keys the call attends; an append reads the new K/V and writes them into the cache.
           Block tables, rotary tables, cu_seqlens and ALiBi slopes are small and not counted.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch

ACTIVE: "Profile | None" = None      # the open profile, read by every op's host entry


@dataclass
class Described:
    """What an op's host says about one call, before it runs: `counts()` gives (FLOPs, bytes) once the profile
    closes (it may read device tensors the host copied for it)."""
    op: str
    shape: str
    spec: Any                                # KernelSpec, or None where nothing launches
    bucket: tuple[int, ...] | None
    config: dict | None                      # the caller's config override, if any
    counts: Callable[[], tuple[float, float]]


@dataclass
class CallRecord:
    op: str
    shape: str
    kernel: str                # the spec's features, compactly
    config: dict
    rule: str                  # how the config was chosen
    flops: float
    bytes: float
    ms: float | None           # device time (None: not measured)
    spec: str = ""             # the spec's canonical key

    @property
    def tflops(self) -> float | None:
        return self.flops / self.ms * 1e-9 if self.ms else None

    @property
    def gbs(self) -> float | None:
        return self.bytes / self.ms * 1e-6 if self.ms else None


@dataclass
class _Pending:
    described: Described
    events: tuple | None = None              # (start, end) CUDA events: read when the profile closes
    wall_ms: float | None = None             # the interpreter's time (it runs the call before returning)

    def ms(self) -> float:
        return self.events[0].elapsed_time(self.events[1]) if self.events else self.wall_ms


@dataclass
class Profile:
    """The calls recorded between __enter__ and __exit__ (`records`, in call order)."""
    records: list[CallRecord] = field(default_factory=list)
    _pending: list[_Pending] = field(default_factory=list)

    def __enter__(self) -> "Profile":
        global ACTIVE
        if ACTIVE is not None:
            raise RuntimeError("flashcore.profile(): a profile is already open (they do not nest)")
        ACTIVE = self
        return self

    def __exit__(self, *exc) -> None:
        global ACTIVE
        ACTIVE = None
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        self.records += [_record(p) for p in self._pending]
        self._pending.clear()

    def measure(self, entry: Callable, arguments: dict, describe: Callable[..., Described]):
        """entry(**arguments), timed and described by describe(**arguments): an op host's entry calls this in its
        own place while the profile is open. The profile steps aside during the call (ACTIVE is None), so the
        entry runs its ordinary path."""
        global ACTIVE
        tensor = next((t for t in arguments.values() if isinstance(t, torch.Tensor)), None)
        on_gpu = tensor is not None and tensor.is_cuda
        described = None
        if not (on_gpu and torch.cuda.is_current_stream_capturing()):     # (a captured call does not run now)
            try:
                described = describe(**arguments)      # before the call: it copies what the call may change
            except Exception:    # arguments the entry refuses: it raises its clear error, and nothing is recorded
                pass
        ACTIVE = None
        try:
            if described is None:
                return entry(**arguments)
            if on_gpu:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                result = entry(**arguments)
                end.record()
                self._pending.append(_Pending(described, events=(start, end)))
            else:
                began = time.perf_counter()
                result = entry(**arguments)
                self._pending.append(_Pending(described, wall_ms=(time.perf_counter() - began) * 1e3))
        finally:
            ACTIVE = self
        return result

    def totals(self) -> dict[str, dict[str, float]]:
        """Per op: calls, device ms, FLOPs and bytes summed over its calls."""
        out: dict[str, dict[str, float]] = {}
        for r in self.records:
            t = out.setdefault(r.op, {"calls": 0, "ms": 0.0, "flops": 0.0, "bytes": 0.0})
            t["calls"] += 1
            t["ms"] += r.ms or 0.0
            t["flops"] += r.flops
            t["bytes"] += r.bytes
        return out

    def summary(self, limit: int | None = 50) -> str:
        """A text table: the first `limit` calls (None: all), then the totals per op."""
        rows = [("op", "shape", "kernel", "config", "rule", "ms", "TFLOP/s", "GB/s")]
        for r in self.records[:limit]:
            rows.append((r.op, r.shape, r.kernel, _config_text(r.config), r.rule, _num(r.ms, 3), _num(r.tflops, 1),
                         _num(r.gbs, 0)))
        lines = _table(rows)
        if limit is not None and len(self.records) > limit:
            lines.append(f"... {len(self.records) - limit} more calls")
        lines.append("")
        totals = [("op", "calls", "ms", "TFLOP/s", "GB/s")]
        for op, t in self.totals().items():
            ms = t["ms"] or None
            totals.append((op, str(t["calls"]), _num(t["ms"], 3), _num(ms and t["flops"] / ms * 1e-9, 1),
                           _num(ms and t["bytes"] / ms * 1e-6, 0)))
        return "\n".join(lines + _table(totals))

    def to_json(self) -> dict:
        """{"calls": [each record, with tflops and gbs], "totals": per op}: JSON-serialisable."""
        return {"calls": [asdict(r) | {"tflops": r.tflops, "gbs": r.gbs} for r in self.records],
                "totals": self.totals()}

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=1)


def profile() -> Profile:
    """`with flashcore.profile() as p:` records every FlashCore call inside the block (module docstring)."""
    return Profile()


def _record(pending: _Pending) -> CallRecord:
    from . import dispatch
    d = pending.described
    flops, moved = d.counts()
    choice = None if d.spec is None or d.config is not None else dispatch.last_choice(d.spec, d.bucket)
    if d.config is not None:
        config, rule = dict(d.config), "config given by the caller"
    elif choice is not None:
        config, rule = dict(choice.config), choice.describe()
    else:         # no spec (an empty input), or dispatch never resolved one: nothing launched
        config, rule = {}, "nothing to launch (empty input)"
    kernel = "-" if d.spec is None else " ".join(k if v is True else f"{k}={v}" for k, v in d.spec.features
                                                 if v is not False)
    return CallRecord(d.op, d.shape, kernel, config, rule, float(flops), float(moved), pending.ms(),
                      "" if d.spec is None else d.spec.key())


def _config_text(config: dict) -> str:
    short = {"BLOCK_M": "M", "BLOCK_N": "N", "num_warps": "w", "num_stages": "s"}
    return " ".join(f"{short.get(k, k)}{'' if k in short else '='}{v}" for k, v in config.items())


def _num(value: float | None, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _table(rows: list[tuple]) -> list[str]:
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
