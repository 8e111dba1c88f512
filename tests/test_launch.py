"""LaunchPlan: keyword launches whose later calls pass only the call's tensors; a plan keeps none of them."""
from __future__ import annotations

import gc
import weakref

import torch
from triton.tools.tensor_descriptor import TensorDescriptor

from flashcore.launch import LaunchPlan


class FakeKernel:
    """Records each launch's keyword arguments (like the interpreter, it returns no compiled kernel)."""

    def __init__(self):
        self.launches = []

    def __getitem__(self, grid):
        def launch(**kwargs):
            self.launches.append((grid, kwargs))
        return launch


def test_later_calls_rebuild_descriptors_over_their_own_tensors_and_keep_none():
    kernel = FakeKernel()
    first, out = torch.zeros(2, 64, 4, 32), torch.zeros(2, 64, 4, 32)
    desc = TensorDescriptor(first, list(first.shape), list(first.stride()), [1, 16, 1, 32])
    plan = LaunchPlan(kernel, grid=(4, 4), dynamic=("Q", "Out"), kwargs=dict(Q=desc, Out=out, n=64, BLOCK=16))
    assert kernel.launches[0] == ((4, 4, 1), dict(Q=desc, Out=out, n=64, BLOCK=16))

    second, out2 = torch.ones(2, 64, 4, 32), torch.ones(2, 64, 4, 32)
    plan(second, out2)
    grid, kwargs = kernel.launches[1]
    assert grid == (4, 4, 1) and kwargs["Out"] is out2 and kwargs["n"] == 64 and kwargs["BLOCK"] == 16
    rebuilt = kwargs["Q"]
    assert isinstance(rebuilt, TensorDescriptor) and rebuilt.base is second
    assert (rebuilt.shape, rebuilt.strides, rebuilt.block_shape) == (desc.shape, desc.strides, desc.block_shape)

    # the plan holds no tensor of its first call (a plan lives as long as its signature is cached)
    refs = [weakref.ref(t) for t in (first, out)]
    del first, out, desc, kwargs, rebuilt
    kernel.launches.clear()
    gc.collect()
    assert all(r() is None for r in refs)
