"""What we run on: the Triton interpreter (CPU) or a CUDA GPU, and which one."""
from __future__ import annotations

import os
from functools import lru_cache

import torch


def interpreter_mode() -> bool:
    """TRITON_INTERPRET=1 runs kernels on the CPU through Triton's interpreter (how CI tests them)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@lru_cache(maxsize=None)
def arch(device_index: int = 0) -> int:
    """Compute capability as an int (90 for sm90); 0 under the interpreter."""
    if interpreter_mode():
        return 0
    major, minor = torch.cuda.get_device_capability(device_index)
    return major * 10 + minor


# GPU names as the tuner and the bundles spell them; matched against torch's device name.
_GPU_NAMES = (("H200", "h200"), ("H100", "h100"), ("H800", "h100"), ("A100", "a100"), ("A800", "a100"),
              ("L40S", "l40s"), ("L4", "l4"), ("B200", "b200"), ("RTX 4090", "rtx4090"))


@lru_cache(maxsize=None)
def gpu_name(device_index: int = 0) -> str:
    """Short GPU name ('h100', 'h200', ...); 'interpreter' on the CPU path, a slug of the full name otherwise."""
    if interpreter_mode():
        return "interpreter"
    if not torch.cuda.is_available():
        return "none"
    full = torch.cuda.get_device_name(device_index)
    for needle, short in _GPU_NAMES:
        if needle in full:
            return short
    return "".join(c for c in full.lower().replace("nvidia", "") if c.isalnum())
