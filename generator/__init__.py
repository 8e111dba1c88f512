"""Kernel generator: KernelSpec -> rendered Triton source -> imported, memoized module."""
from .render import add_template_dir, cache_dir, load, render, source_hash, spec_version
from .spec import KernelSpec, parse_feature_value

__all__ = ["KernelSpec", "add_template_dir", "parse_feature_value", "cache_dir", "load", "render", "source_hash",
           "spec_version"]
