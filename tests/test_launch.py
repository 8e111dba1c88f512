"""LaunchPlan: keyword launches whose later calls pass only the call's tensors; a plan keeps none of them. And what
the ops share around their plans: call signatures, the bounded cache of kept plans, steps picking tensors by slot."""
from __future__ import annotations

import gc
import weakref

import pytest
import torch
from triton.tools.tensor_descriptor import TensorDescriptor

from flashcore import dispatch
from flashcore.launch import KeptPlans, LaunchPlan, launched_step, signature


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


def test_launch_hooks_count_only_when_a_chain_holds_one(monkeypatch):
    """A profiler's hook sends launches through Triton's own path (which calls it); Triton's empty hook chains
    do not. Read on every call: installed or removed between two launches, it is seen."""
    from triton import knobs

    from flashcore.launch import _hooks_set

    assert not _hooks_set()
    chain = type(knobs.runtime.launch_enter_hook)()
    monkeypatch.setattr(knobs.runtime, "launch_enter_hook", chain)
    assert not _hooks_set()
    chain.add(lambda *args, **kwargs: None)
    assert _hooks_set()
    monkeypatch.undo()
    monkeypatch.setattr(knobs.runtime, "launch_exit_hook", lambda *args, **kwargs: None)   # a plain function
    assert _hooks_set()
    monkeypatch.setattr(knobs.runtime, "launch_exit_hook", None)
    assert not _hooks_set()



def test_kept_plans_start_over_when_full_and_are_forgotten_on_dispatch_clear():
    plans = KeptPlans(bound=2)
    plans.put("a", 1)
    plans.put("b", 2)
    assert len(plans) == 2 and plans.get("a") == 1 and sorted(plans.values()) == [1, 2]
    plans.put("c", 3)         # full: starts over rather than grow
    assert len(plans) == 1 and plans.get("a") is None and plans.get("c") == 3
    dispatch.clear()          # the plans hold configs dispatch chose
    assert not plans and plans.get("c") is None


def test_signature_tells_apart_what_triton_specializes_on():
    base = torch.zeros(8, 8)
    key = signature((base, None), (1.0, True))
    assert key == signature((torch.ones(8, 8), None), (1.0, True))          # values do not count
    misaligned = torch.zeros(8 * 8 + 1)[1:].view(8, 8)                        # 4 bytes past a 16-byte boundary
    assert misaligned.stride() == base.stride() and misaligned.data_ptr() % 16
    others = [signature((misaligned, None), (1.0, True)),                    # alignment
              signature((base.t(), None), (1.0, True)),                      # strides
              signature((base.half(), None), (1.0, True)),                   # dtype
              signature((base.view(4, 16), None), (1.0, True)),              # shape
              signature((base, base), (1.0, True)),                          # an absent tensor is not a present one
              signature((base, None), (1.0, 1))]                             # True == 1, but not as an option
    assert len({key, *others}) == 1 + len(others)
    assert signature((base, [1, 2]), ()) is None and signature(("q",), ()) is None   # not tensors: no key


def test_a_step_picks_its_tensors_by_slot_and_passes_absent_ones_as_none():
    kernel = FakeKernel()
    call = (torch.zeros(2), None, torch.zeros(3), torch.zeros(4))
    step = launched_step(kernel, (2,), dict(A=0, B=1, C=3), call, n=5)       # launches once as it is built
    assert kernel.launches == [((2, 1, 1), dict(A=call[0], B=None, C=call[3], n=5))]
    assert step.plan.dynamic == ("A", "C")
    later = (torch.ones(2), None, torch.ones(3), torch.ones(4))
    step(later, None)         # (stream None: Triton's own path, as the interpreter takes)
    grid, kwargs = kernel.launches[1]
    assert grid == (2, 1, 1) and kwargs["A"] is later[0] and kwargs["C"] is later[3]
    assert kwargs["B"] is None and kwargs["n"] == 5

    single = launched_step(kernel, (1,), dict(C=2), call)                    # one slot: still a tuple of one
    assert single.pick(later) == (later[2],)
    single(later, None)
    assert kernel.launches[-1][1]["C"] is later[2]

@pytest.mark.gpu
def test_tensor_maps_follow_each_calls_addresses():
    """The raw launch keeps each descriptor's last tensor map for calls at the same address: calls that alternate
    tensors, mix them, or reuse an address with new contents each get their own inputs' answer."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("tensor descriptors (TMA) need sm90+")
    import flashcore
    from flashcore.ops.attn_fwd import host
    from flashcore.reference import assert_close_attention

    def make():
        return [torch.randn(2, 256, 4, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3)]

    host._plans.clear()
    a, b = make(), make()
    for q, k, v in (a, b, a, (a[0], b[1], a[2]), (b[0], a[1], b[2]), a):
        out = flashcore.flash_attn_func(q, k, v, causal=True)
        assert_close_attention(out, q, k, v, causal=True)
    for t in a:
        t.copy_(torch.randn_like(t))      # same addresses, new contents
    assert_close_attention(flashcore.flash_attn_func(*a, causal=True), *a, causal=True)
    (plan,) = host._plans.values()
    assert plan.raw is not None, "the plan did not take the raw launch path"


def test_an_untested_triton_release_launches_through_tritons_public_path_with_one_warning(monkeypatch):
    """The fast path mirrors one Triton release's internals: on another (here a made-up 9.1 on a 'GPU' whose
    first launch returns a compiled kernel) the plan keeps no fast launcher and every call goes through
    kernel[grid](...), after a single warning."""
    import warnings
    from types import SimpleNamespace

    from flashcore import launch

    class CompilingKernel(FakeKernel):
        params = []

        def __getitem__(self, grid):
            def run(**kwargs):
                self.launches.append((grid, kwargs))
                return SimpleNamespace(run=object(), function=object(), packed_metadata=object())
            return run

    monkeypatch.setattr(launch, "interpreter_mode", lambda: False)
    monkeypatch.setattr(launch, "_fast_launch", None)
    monkeypatch.setattr(launch.triton, "__version__", "9.1.0")
    kernel, first, second = CompilingKernel(), torch.zeros(4), torch.ones(4)
    with pytest.warns(RuntimeWarning, match="Triton 9.1.0 is not a release"):
        plan = LaunchPlan(kernel, (2,), ["X"], {"X": first, "N": 4})
    assert plan.run is None and plan.current_stream() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")                 # no second warning
        LaunchPlan(kernel, (2,), ["X"], {"X": first, "N": 4})(second)
    assert kernel.launches[-1] == ((2, 1, 1), {"N": 4, "X": second})
    monkeypatch.setattr(launch, "_fast_launch", None)
    monkeypatch.setattr(launch.triton, "__version__", "3.6.0")
    assert launch.fast_launch_known()
