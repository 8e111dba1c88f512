"""Poisoned allocations: every torch.empty / torch.empty_like made while active comes back NaN-filled, so an
output element or lse row a kernel forgets to write fails the comparison with the reference. The decode's kept
scratch for split partials is dropped on entry, so the call inside allocates it poisoned too."""
from __future__ import annotations

import contextlib
from unittest import mock

import torch

_real_empty, _real_empty_like = torch.empty, torch.empty_like


def _poison(t: torch.Tensor) -> torch.Tensor:
    if t.is_floating_point() or t.is_complex():
        t.fill_(float("nan"))
    return t


@contextlib.contextmanager
def poisoned_allocations():
    from flashcore.ops.attn_decode import host
    host._scratch.clear()       # the split partials' kept scratch: allocated afresh (poisoned) by the next call
    with mock.patch.object(torch, "empty", lambda *a, **k: _poison(_real_empty(*a, **k))), \
            mock.patch.object(torch, "empty_like", lambda *a, **k: _poison(_real_empty_like(*a, **k))):
        yield
