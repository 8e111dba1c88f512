"""What an op's benchmark suite is: the interface between flashcore-bench (tools/bench.py) and the ops.

An op names its suites in `Op.bench` ("module:attribute", a list of `Suite`). A suite says what to run: its cases,
the implementations to time on each (FlashCore and its peers), how to build their inputs, how to check FlashCore's
answer. The harness says how: it parses the command line (a suite may add options), times every implementation,
computes the ratios and writes the reports. Nothing here imports torch or needs a GPU.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable


@dataclass(frozen=True)
class Case:
    """One row of a suite's table."""
    call: Any                              # the suite's description of the case, a dataclass (reports store its fields)
    columns: tuple[tuple[str, str], ...]   # (header, cell) pairs: the case's columns in the table
    label: str                             # one line, for progress and --list
    work: float = 0.0                      # one call's work: FLOPs for a TFLOP/s suite, bytes for a GB/s suite


@dataclass
class Prepared:
    """One case ready to time: inputs built once and shared by every callable."""
    impls: dict[str, Callable[[], Any]]    # impl -> one call on those inputs; one that raises is recorded n/a
    # FlashCore's output against a reference: {'status': 'ok' | 'WRONG' | 'ERROR' | 'no ref', ...}
    check: Callable[[], dict] | None = None


def or_failing(build: Callable[[], Callable[[], Any]]) -> Callable[[], Any]:
    """build(), or, if building fails (a peer not installed, a compile error), a callable raising that error: the
    harness then records the impl n/a for this case and the others still run."""
    try:
        return build()
    except Exception as exc:
        # without its traceback: the frames of a failed setup (and the inputs they hold, up to tens of GiB) are
        # freed now, not kept alive until a garbage collection
        error = exc.with_traceback(None)

        def fail():
            raise error
        return fail


def verdict(checks: Iterable[tuple[float, float]]) -> dict:
    """A case's check from several (error, tolerance) pairs: the one furthest over (or nearest to) its tolerance
    decides (a NaN error is the furthest)."""
    err, tol = max(checks, key=lambda check: math.inf if math.isnan(check[0]) else check[0] / check[1])
    return {"status": "ok" if err <= tol else "WRONG", "max_err": err, "tolerance": tol}


class Suite:
    """A benchmark suite: subclass, set the attributes, write `cases` and `setup`.

    Timing ("device" or "host") is the harness's:
      device  the median (ms) of CUDA events around each call, L2 flushed before it, in --rounds rounds with the
              impls in turns (the median round), and the rate: Case.work per second in `unit`. Ratios are
              FlashCore's throughput over the other impl's (> 1: FlashCore faster).
      host    per call, the CPU time to issue it (back-to-back calls, no sync) and its latency (call, then
              synchronize). Ratios are FlashCore's host time over the other impl's (< 1: FlashCore cheaper).
    The flush ("write" or "read") decides what L2 holds when a timed device call starts:
      write   triton's do_bench: a 256 MB zero_, so L2 is full of dirty lines, and their write-back competes
              with the call's reads (about 8.5 us of a 48 us batch-1 decode on an H200:
              benchmarks/h200-2026-12-04h/flush-ab.txt);
      read    the same loop after a 256 MB read: L2 full of clean lines, as a decode step finds it after the
              projections before it (they read weights and write a few activations).
    With `memory` on (device timing), the harness also measures each impl's peak memory: the device memory one
    call allocates at its peak beyond what was allocated before it (the case's inputs and whatever the suite's
    setup keeps alive, e.g. a forward's saved tensors), in MiB, reported in a "<impl> MiB" column.
    """
    name: str = ""                          # --suite NAME; reports <op>.<name>.{json,csv,md}
    title: str = ""                         # the report's heading
    notes: str = ""                         # for the report: how the cases are built, what the ratios say
    timing: str = "device"                  # "device" or "host"
    flush: str = "write"                    # device timing: "write" or "read" (above); --flush overrides it
    unit: str = "TFLOP/s"                   # device timing: "TFLOP/s" (work in FLOPs) or "GB/s" (work in bytes)
    memory: bool = False                    # device timing: also report each impl's peak memory of one call
    labels: dict[str, str] = {}             # impl -> its table label; "flashcore" is the one ratios are about
    variants: tuple[str, ...] = ()          # other FlashCore impls (e.g. its default config): never the best peer
    ratios: dict[str, str] = {}             # ratio column -> header: "best" (the best peer) or an impl's name

    def add_arguments(self, group: Any) -> None:
        """The suite's own command-line options, added to an argparse argument group (one parser for every suite of
        the run: option names must not clash)."""

    def cases(self, args: argparse.Namespace) -> list[Case]:
        """The cases the options select; a ValueError is a usage error."""
        raise NotImplementedError

    def impls(self, args: argparse.Namespace) -> list[str]:
        """The implementations the options select, "flashcore" first."""
        return list(self.labels)

    def setup(self, case: Case, impls: list[str]) -> Prepared:
        """Inputs for `case` (on the GPU) and a callable per name in `impls`."""
        raise NotImplementedError

    def versions(self) -> dict[str, str]:
        """Peer versions for the report's header, e.g. {'flash-attn': '2.8.3'}."""
        return {}

    def setup_seconds(self, impls: list[str]) -> float:
        """Seconds per case beyond timing (inputs, compiles): --list's time estimate."""
        return 0.5
