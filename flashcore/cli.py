"""`flashcore`: small commands around the runtime (what would run, and what its source is)."""
from __future__ import annotations

import argparse
import sys

import torch

from . import __version__
from .device import arch, gpu_name, interpreter_mode
from .generator import KernelSpec, cache_dir, render, source_hash


def _parse_feature(text: str):
    name, _, value = text.partition("=")
    if value.lower() in ("true", "false"):
        return name, value.lower() == "true"
    try:
        return name, int(value)
    except ValueError:
        return name, value


def cmd_gen(args) -> int:
    """Print the rendered Triton source of a spec, e.g. `flashcore gen --show head_dim=128 causal=true`."""
    features = {"arch": 90, "dtype": "bf16", "head_dim": 128, "causal": False, "window": False, "softcap": False,
                "gqa_group": 1, "tma": False}
    features.update(dict(_parse_feature(f) for f in args.features))
    spec = KernelSpec.make(args.template, **features)
    if args.show:
        sys.stdout.write(render(spec))
    else:
        print(f"{spec}\n  module: {cache_dir() / (spec.template + '_' + source_hash(spec) + '.py')}")
    return 0


def cmd_info(args) -> int:
    print(f"flashcore {__version__}  torch {torch.__version__}  triton {__import__('triton').__version__}")
    if interpreter_mode():
        print("device: Triton interpreter (TRITON_INTERPRET=1), CPU tensors")
    elif torch.cuda.is_available():
        print(f"device: {torch.cuda.get_device_name()} ({gpu_name()}, sm{arch()})")
    else:
        print("device: no CUDA GPU found (set TRITON_INTERPRET=1 to run kernels on the CPU)")
    print(f"kernel cache: {cache_dir()}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="flashcore", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_info = sub.add_parser("info", help="versions, device, caches")
    p_info.set_defaults(func=cmd_info)
    p_gen = sub.add_parser("gen", help="render a kernel spec")
    p_gen.add_argument("--template", default="attn_fwd", help="templates/<name>.py.jinja (default attn_fwd)")
    p_gen.add_argument("features", nargs="*", help="name=value overrides, e.g. head_dim=80 causal=true")
    p_gen.add_argument("--show", action="store_true", help="print the rendered source")
    p_gen.set_defaults(func=cmd_gen)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
