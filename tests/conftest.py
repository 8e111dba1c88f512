"""Test setup: where kernels run, and where generated kernels are cached.

On a machine without a CUDA GPU, kernels run on the CPU through Triton's interpreter. TRITON_INTERPRET has to
be set before any generated kernel module is imported (triton.jit reads it when the module is decorated), so
it is set here at import time, before any test module imports flashcore. On a GPU machine nothing is forced:
`pytest -m gpu` runs the real kernels (a few minutes); `pytest -m gpu_extended` re-runs the CPU suite's cases
(test_forward.py) on them, bf16 included (long: many kernel compiles); TRITON_INTERPRET=1 runs the CPU suite.
"""
from __future__ import annotations

import os
import shutil
import tempfile

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

# A fresh kernel cache per session, set before flashcore can read it; removed at the end.
_CACHE_ROOT = tempfile.mkdtemp(prefix="flashcore-test-cache-")
os.environ["FLASHCORE_CACHE_DIR"] = _CACHE_ROOT
# The user's own tuning DB (~/.cache/flashcore/tuning.db) must not steer the tests: point at an empty session one
# (a missing DB is silent), unless the caller chose one on purpose. Shipped bundles still apply.
os.environ.setdefault("FLASHCORE_TUNING_DB", os.path.join(_CACHE_ROOT, "tuning.db"))

import pytest  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes seconds, not milliseconds (still in the default run)")
    config.addinivalue_line(
        "markers", "gpu_extended: the CPU suite's cases on a GPU's real kernels, bf16 included (hundreds of kernel "
                   "compiles, 10+ minutes cold): run only when selected, `pytest -m gpu_extended`")


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_CACHE_ROOT, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA and not INTERPRET:
        # On a GPU machine, the CPU suite re-run on the real kernels only when asked for by name.
        if "gpu_extended" not in (config.option.markexpr or ""):
            skip_ext = pytest.mark.skip(reason="CPU suite on the GPU: select it with -m gpu_extended")
            for item in items:
                if item.get_closest_marker("gpu_extended"):
                    item.add_marker(skip_ext)
        return
    reason = ("needs a CUDA GPU" if not HAS_CUDA
              else "TRITON_INTERPRET=1: GPU tests need the real kernels (unset TRITON_INTERPRET)")
    skip_gpu = pytest.mark.skip(reason=reason)
    for item in items:
        if item.get_closest_marker("gpu") or item.get_closest_marker("gpu_extended"):
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def interpret() -> bool:
    return INTERPRET


@pytest.fixture(scope="session")
def device() -> str:
    """Where test tensors live: the CPU under the interpreter, the GPU otherwise."""
    return "cpu" if INTERPRET else "cuda"


@pytest.fixture
def cpu_only(interpret):
    """For tests of the interpreter path (CPU correctness suite)."""
    if not interpret:
        pytest.skip("CPU interpreter tests: run with TRITON_INTERPRET=1 (or on a machine without CUDA)")


@pytest.fixture(scope="session")
def cache_dir() -> str:
    return _CACHE_ROOT


@pytest.fixture(autouse=True)
def _seed(request):
    """Fresh but reproducible inputs: a different seed per test, derived from its id."""
    import zlib
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture
def kv_checks(monkeypatch):
    """kv_checks("strict" / "0" / ...): $FLASHCORE_KV_CHECKS for this test. flashcore reads it at the first call and
    again after dispatch.clear(), which also forgets the kept plans: cleared here when set, and after the test."""
    from flashcore import dispatch

    def set_mode(mode: str) -> None:
        monkeypatch.setenv("FLASHCORE_KV_CHECKS", mode)
        dispatch.clear()
    yield set_mode
    dispatch.clear()


@pytest.fixture(params=[True, False], ids=["inline_merge", "combine_kernel"])
def merge_inline(request, monkeypatch):
    """Split calls merge their splits inline (the last split of each pair) or through the combine kernel, whatever
    host.merge_inline would choose for the shape and config; plans are rebuilt before and after."""
    from flashcore import dispatch
    from flashcore.ops.attn_decode import host
    monkeypatch.setattr(host, "merge_inline", lambda splits, *args: request.param and splits > 1)
    dispatch.clear()
    yield request.param
    dispatch.clear()
