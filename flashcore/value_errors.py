"""The value checks of calls whose tensors' values matter (KV-cache lengths, cu_seqlens, block tables): when they
run, and the failures that could not raise at their call: reported later, named, never lost.

On a GPU a call checks the values its kernels use on the device, without a sync: a failing sequence writes nothing
and reads NaN, and its kernel writes the failure into the device's report, (16,) int32 in pinned host memory
(templates/macros/value_checks.jinja: code, sequence, value, extra, then five scalars of the call, REPORTED; the
code last). The host reads the code word, a plain memory read, at the start of every FlashCore call on that device
(`raise_pending`), at `check_errors()`, and at exit (a warning), so a failure surfaces at the next call of any
FlashCore function and is never dropped.

The kernels report no call id (that would be a template change, and a retune of every decode record), so the
message names the call by what the report holds: the kept call signatures whose scalars match it, the one called
last first, with its call number since the last report.
"""
from __future__ import annotations

import atexit
import os
import warnings
import weakref
from functools import lru_cache

import torch

from . import dispatch

# what the report's words 4..8 hold (value_checks.jinja's _report_failure): a KV-cache call's; a varlen call
# reports (capacity, total_q, total_k, max_seqlen_q, max_seqlen_k) in the same words
REPORTED = ("capacity", "seqlen_new", "num_cache_rows", "seqlen_ro", "rotary_span")

CHECK_MODES = {"0": "off", "off": "off", "strict": "strict", "sync": "strict", "deferred": "deferred"}


@lru_cache(maxsize=None)
def value_check_mode() -> str:
    """How calls check values ($FLASHCORE_KV_CHECKS, read at the first call and again after `dispatch.clear()`;
    reading the environment on every call would cost a decode step about a microsecond):
    "auto" (unset, the default): values the host holds raise at the call (an int cache_seqlens, CPU tensors under
    the interpreter: strict there, no sync to pay); on a GPU the kernels check what they use, without a sync: a
    failing sequence is not written, its output is NaN, and the failure is raised by the next FlashCore call on
    the device, or by flashcore.check_errors() (CUDA-graph replays check the same way);
    "deferred": the GPU's way on every device (tests of the deferred path run it under the interpreter);
    "strict" ("sync"): eager calls check first and raise at the failing call (one device sync per call);
    "off" ("0"): no checks of tensor values. In every mode the kernels never address memory outside the tensors."""
    return CHECK_MODES.get(os.environ.get("FLASHCORE_KV_CHECKS"), "auto")


def checks_at_the_call(mode: str, device: torch.device) -> bool:
    """Whether a call on `device` checks values on the host before launching (and raises there)."""
    return mode == "strict" or (mode == "auto" and device.type != "cuda")


dispatch.on_clear(value_check_mode.cache_clear)


class Reporter:
    """One device's failure report, the count of KV-cache calls on it since its last failure was raised, and the
    call signatures whose kernels write to it (weakly: a signature dispatch forgot names no call)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.tensor = torch.zeros(16, dtype=torch.int32, pin_memory=device.type == "cuda")
        self.view = self.tensor.numpy()        # the host reads it without a sync
        self.calls = 0
        self.signatures: weakref.WeakSet = weakref.WeakSet()

    def count(self, signature) -> None:
        """A call of `signature` (a kept plan) is made: its number, for the messages."""
        self.calls += 1
        signature.last_call = self.calls

    def reset(self) -> None:
        self.view[:] = 0
        self.calls = 0


# device -> its Reporter, created by the first call that may report on it
REPORTERS: dict[torch.device, Reporter] = {}


def reporter(device: torch.device) -> Reporter:
    if device not in REPORTERS:
        REPORTERS[device] = Reporter(device)
    return REPORTERS[device]


def describe_failure(code: int, b: int, value: int, extra: int, capacity: int, seqlen_new: int, num_cache_rows: int,
                     seqlen_ro: int, rotary_span: int) -> str:
    """A value check's failure `code` of sequence b as a message naming the argument."""
    if code == 1:
        return f"cache_seqlens[{b}] = {value} is negative"
    if code == 2:
        return (f"cache overflow: cache_seqlens[{b}] = {value} plus {seqlen_new} new tokens exceeds the cache capacity "
                f"of {capacity} tokens per sequence")
    if code == 3:
        return f"cache_leftpad[{b}] = {value} must be in [0, cache_seqlens[{b}] = {extra}]"
    if code == 4:
        return f"cache_batch_idx[{b}] = {value} is outside [0, {num_cache_rows}) (the k_cache batch)"
    if code == 5:
        return f"block_table[{b}, {value}] = {extra} is outside [0, {num_cache_rows}) (the number of cache blocks)"
    if code == 7:             # varlen: seqlen_new is total_q, num_cache_rows total_k (packed k)
        return (f"cu_seqlens_q[{b}], cu_seqlens_q[{b + 1}] = {value}, {extra}: expected cu_seqlens_q to rise from 0 "
                f"to total_q = {seqlen_new} (q's rows) without decreasing")
    if code == 8:
        return (f"cu_seqlens_k[{b}], cu_seqlens_k[{b + 1}] = {value}, {extra}: expected cu_seqlens_k to rise from 0 "
                f"without decreasing, to total_k = {num_cache_rows} (k's rows) unless k is a paged cache")
    if code == 9:             # seqlen_ro is max_seqlen_q, rotary_span max_seqlen_k
        return f"sequence {b} has {value} query tokens (cu_seqlens_q), more than max_seqlen_q = {seqlen_ro}"
    if code == 10:
        return f"sequence {b} has {value} keys (cu_seqlens_k), more than max_seqlen_k = {rotary_span}"
    if code == 11:
        return (f"sequence {b} has {value} keys (cu_seqlens_k), more than its block_table row holds ({capacity} "
                "= max_blocks x block size)")
    return (f"rotary_cos / rotary_sin have {seqlen_ro} positions, but sequence {b} rotates positions up to "
            f"{value + rotary_span - 1}")


def _culprit(found: Reporter, b: int, scalars: tuple) -> str:
    """Which call wrote the report: the kept signatures whose kernels report exactly these scalars."""
    matches = sorted((s for s in list(found.signatures) if s.reports_as(b, scalars)), key=lambda s: -s.last_call)
    if not matches:
        return ("a call whose signature is no longer kept (a CUDA-graph replay, or a plan dispatch.clear() "
                "forgot)")
    first = matches[0]
    text = (f"{first.function} with {first.description} (its last one was call #{first.last_call} of the "
            f"{found.calls} value-checked calls on {found.device} since the last report)")
    others = len(matches) - 1
    if others:
        text += (f", or a call of {'another signature' if others == 1 else f'one of {others} other signatures'} "
                 "with the same cache shapes")
    return text


def pending_error(device: torch.device) -> ValueError | None:
    """The failure reported on `device`, if any, as the error to raise (and the report cleared: raised once).
    Synchronizes the device first when there is one, so that its writer has finished writing."""
    found = REPORTERS.get(device)
    if found is None or not found.view[0]:
        return None
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    code, b, value, extra, *scalars = found.view[:9].tolist()
    culprit = _culprit(found, b, tuple(scalars))
    found.reset()
    return ValueError(f"{describe_failure(code, b, value, extra, *scalars)}. Found by the value check of an earlier "
                      f"call on {device}, which did not raise there (no device sync): {culprit}. That call wrote "
                      f"nothing for sequence {b} and returned NaN for it. $FLASHCORE_KV_CHECKS=strict raises at "
                      "the failing call, at one device sync per call")


def raise_pending(device: torch.device) -> None:
    """Raises the failure an earlier call reported on `device`, if any: the hot paths call it when the report's code
    word (Reporter.view[0]) is set."""
    error = pending_error(device)
    if error is not None:
        raise error


def check_errors(device: torch.device | str | int | None = None) -> None:
    """Raises now the value-check failure an earlier FlashCore call reported without a sync, if any: on `device`,
    or on every device a call reported to (None). One device synchronization per device that has a failure.

    A serving loop calls it where it chooses (e.g. once per scheduler step) instead of letting the next FlashCore
    call raise."""
    devices = list(REPORTERS) if device is None else [torch.device(device)]
    for d in devices:
        if d.type == "cuda" and d.index is None:
            d = torch.device("cuda", torch.cuda.current_device())
        raise_pending(d)


@atexit.register
def _warn_at_exit() -> None:
    """A failure still pending when the process exits is printed, not lost."""
    for device in list(REPORTERS):
        try:
            if device.type == "cuda":
                torch.cuda.synchronize(device)      # (kernels still running may yet report)
            error = pending_error(device)
        except Exception as e:       # (the CUDA context may already be going)
            error = f"reading the value checks' report of {device} at exit failed: {e}"
        if error is not None:
            warnings.warn(f"FlashCore: a failure never raised before exit: {error}", RuntimeWarning, stacklevel=1)
