"""Kernel generator: KernelSpec -> rendered Triton source -> imported, memoized module."""
from .render import cache_dir, load, render, source_hash, template_hash
from .spec import KernelSpec, parse_feature_value

__all__ = ["KernelSpec", "parse_feature_value", "cache_dir", "load", "render", "source_hash", "template_hash"]
