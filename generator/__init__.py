"""Kernel generator: KernelSpec -> rendered Triton source -> imported, memoized module."""
from .render import cache_dir, load, render, source_hash, template_hash
from .spec import KernelSpec

__all__ = ["KernelSpec", "cache_dir", "load", "render", "source_hash", "template_hash"]
