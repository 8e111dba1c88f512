"""What the source-variant probes share: a kernel module from edited rendered source, and their timer."""
from __future__ import annotations

import importlib.util
import os
import sys
import tempfile

from triton.testing import do_bench


def module_of(source: str, name: str):
    """The module of `source` (a generated kernel's rendered text, edited), imported from a file of its own: Triton
    compiles a jit function from its source file."""
    path = os.path.join(tempfile.mkdtemp(), f"{name}.py")
    with open(path, "w") as f:
        f.write(source)
    spec = importlib.util.spec_from_file_location(f"probe_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def median_ms(fn) -> float:
    return do_bench(fn, warmup=10, rep=60, return_mode="median")
