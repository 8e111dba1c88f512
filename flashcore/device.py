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


@lru_cache(maxsize=None)
def programmatic_launch(cc: int) -> bool:
    """Programmatic dependent launch (PDL): on sm90 and newer a kernel launched with it may start while the one
    before it on the stream drains, once that one lets it (griddepcontrol.launch_dependents), and waits for it
    (griddepcontrol.wait) before reading its results. Needs a Triton that exposes it (the launch_pdl option,
    tl.extra.cuda.gdc_wait); never under the interpreter (cc 0)."""
    if cc < 90:
        return False
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
        from triton.language.extra import cuda
    except ImportError:
        return False
    return "launch_pdl" in CUDAOptions.__dataclass_fields__ and hasattr(cuda, "gdc_wait") \
        and hasattr(cuda, "gdc_launch_dependents")


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


# -- limits of the GPU a kernel config must respect (static feasibility of tile configs) --

# Shared memory one block may use (bytes), by compute capability: the opt-in maximum.
SMEM_LIMIT = {90: 232448, 100: 232448, 80: 166912, 87: 166912, 86: 101376, 89: 101376, 120: 101376}
MAX_REGS_PER_THREAD = 255
REGS_PER_BLOCK = 65536          # a block's threads share the register file: 16 warps get 128 registers each
MAX_GRID_YZ = 65535             # CUDA's limit on the y and z grid dimensions


def arch_class(cc: int) -> str:
    """The class heuristic tile tables are keyed by: "sm90" (Hopper and newer), "sm80" (Ampere / Ada), "cpu"
    (the interpreter, cc 0)."""
    return "cpu" if cc == 0 else "sm90" if cc >= 90 else "sm80"


def smem_limit(cc: int) -> int:
    return SMEM_LIMIT.get(cc, SMEM_LIMIT[90] if cc >= 90 else SMEM_LIMIT[86])


def regs_limit(num_warps: int) -> int:
    """Registers one thread may hold in a block of num_warps warps."""
    return min(MAX_REGS_PER_THREAD, REGS_PER_BLOCK // (num_warps * 32))
