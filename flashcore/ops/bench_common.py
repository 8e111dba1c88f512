"""What the ops' benchmark suites share (flashcore-bench; never imported by the runtime): the optional peers'
imports and versions, FlashInfer's page lists, shuffled block tables, how FlashCore's eager calls check values.

Every peer is optional: its import happens inside the builder that needs it, so a missing package (or a build for
another torch / CUDA) makes that peer n/a for a case, never the run.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import os

import torch

# Packaged peers for the reports' headers: name -> (module to import, distribution for its version)
PEER_PACKAGES = {"FlashInfer": ("flashinfer", "flashinfer-python"), "flash-attn 4": ("flash_attn.cute", "flash-attn-4")}
FLASHINFER_WORKSPACE = 128 * 1024 * 1024     # bytes, the size FlashInfer's documentation recommends


def peer_versions() -> dict[str, str]:
    """Each packaged peer's version, or why it cannot be imported."""
    found = {}
    for name, (module, distribution) in PEER_PACKAGES.items():
        try:
            importlib.import_module(module)
        except Exception as exc:   # ImportError, or a build for another torch / CUDA
            found[name] = f"not importable ({type(exc).__name__})"
            continue
        try:
            found[name] = importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "installed"
    return found


def import_flashinfer():
    """flashinfer, with JIT compilation off: a module missing from the carried prebuilt set (shared/peers: bf16,
    head_dim 128 on sm90) would compile for minutes inside a timed run; with JIT off it is an error (n/a) instead."""
    os.environ.setdefault("FLASHINFER_DISABLE_JIT", "1")
    import flashinfer
    return flashinfer


def flashinfer_workspace(device) -> torch.Tensor:
    return torch.zeros(FLASHINFER_WORKSPACE, dtype=torch.uint8, device=device)


def flashinfer_csr(table: torch.Tensor, lengths: list[int], page: int) -> tuple[torch.Tensor, ...]:
    """FlashInfer's page lists from a page table: (indptr (B+1,), indices (total pages,), last_page_len (B,)),
    int32 on the CPU; sequence b holds ceil(lengths[b] / page) pages, its last one filled to 1..page tokens."""
    used = torch.tensor([-(-n // page) for n in lengths], dtype=torch.int32)
    taken = torch.arange(table.shape[1])[None, :] < used[:, None]
    indices = table[taken].to(torch.int32)                  # row-major: each sequence's pages in order
    indptr = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    indptr[1:] = torch.cumsum(used, 0)
    last = torch.tensor(lengths, dtype=torch.int32) - (used - 1) * page
    return indptr, indices, last


def shuffled_table(used: list[int], width: int) -> torch.Tensor:
    """(len(used), width) int32 on the CPU: row b's first used[b] entries are distinct blocks of a pool holding just
    those (sum(used) blocks), in random order (torch's global seed); the entries past them are 0 (never read)."""
    order = torch.randperm(sum(used)).to(torch.int32)
    table = torch.zeros(len(used), width, dtype=torch.int32)
    start = 0
    for b, n in enumerate(used):
        table[b, :n] = order[start:start + n]
        start += n
    return table


def value_checks_note() -> str:
    """How this process's eager FlashCore calls check values (read when the report is written)."""
    from ..value_errors import value_check_mode
    on_gpu = "Eager FlashCore calls run their value check on the GPU (the default: no device sync)."
    return {"auto": on_gpu, "deferred": on_gpu,
            "strict": "Eager FlashCore calls run their value check and read it ($FLASHCORE_KV_CHECKS=strict: one "
                      "device sync per call).",
            "off": "Eager FlashCore calls skip their value check ($FLASHCORE_KV_CHECKS=0)."}[value_check_mode()]
