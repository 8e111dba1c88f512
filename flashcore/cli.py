"""`flashcore`: small commands around the runtime (what would run, and what its source is)."""
from __future__ import annotations

import argparse
import sys

import torch

from . import __version__, forward
from .device import arch, gpu_name, interpreter_mode
from .generator import KernelSpec, cache_dir, parse_feature_value, render, source_hash


def cmd_gen(args) -> int:
    """Print the rendered Triton source of a spec, e.g. `flashcore gen --show head_dim=128 causal=true`."""
    features = forward.build_spec(90, aligned=False).as_dict()   # defaults: an sm90 bf16 D=128 spec
    for item in args.features:
        name, _, value = item.partition("=")
        features[name] = parse_feature_value(value)
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
    _info_tuning(args)
    return 0


def _info_tuning(args) -> None:
    """Which tuning DB and bundle dispatch uses, their record counts, and (with a shape) the config that runs."""
    from . import dispatch
    from .generator import template_hash
    from .tunable import GPU_ARCH
    from .tunable import get as get_tunable
    from .tuning_db import BundleError, TuningDBError, TuningDB, bundle_path, read_bundle, user_db_path

    gpu = args.gpu or dispatch.current_gpu()
    cc = GPU_ARCH.get(gpu, 90) if args.gpu else (arch() if torch.cuda.is_available() or interpreter_mode() else 0)
    thash = template_hash(args.template)
    print(f"tuning: records for GPU {gpu!r}, template {args.template} version {thash}"
          + ("" if dispatch.tuning_enabled() else "  (FLASHCORE_TUNING=off: heuristic defaults only)"))

    def describe(records) -> str:
        mine = [r for r in records if r.gpu == gpu and r.template == args.template]
        current = sum(1 for r in mine if r.template_hash == thash)
        return (f"{len(records)} records; {len(mine)} for {gpu} {args.template}: {current} current, "
                f"{len(mine) - current} stale (older template versions, never used)")

    path = user_db_path()
    if path is None:
        print("  user DB: disabled (FLASHCORE_TUNING_DB=off)")
    elif not path.exists():
        print(f"  user DB: {path} (none yet; flashcore-tune writes it)")
    else:
        try:
            with TuningDB(path, readonly=True, timeout=1.0) as db:
                print(f"  user DB: {path}: {describe(db.records())}")
        except TuningDBError as e:
            print(f"  user DB: unusable, ignored: {e}")
    bpath = bundle_path(gpu)
    if not bpath.exists():
        print(f"  bundle:  none shipped for {gpu} ({bpath})")
    else:
        try:
            bundle, records = read_bundle(bpath, expect_gpu=gpu)
            created = bundle.get("provenance", {}).get("created_at", "?")
            print(f"  bundle:  {bpath} (created {created}): {describe(records)}")
        except BundleError as e:
            print(f"  bundle:  unusable, ignored: {e}")

    if args.seqlen is None and args.seqlen_q is None:
        print("  (give --seqlen, --heads, --head-dim, ... to see which config a call would run)")
        return
    tunable = get_tunable(args.template)
    seqlen_q = args.seqlen_q or args.seqlen
    seqlen_k = args.seqlen_k or args.seqlen or seqlen_q
    desc = {"batch": args.batch, "seqlen_q": seqlen_q, "seqlen_k": seqlen_k, "heads_q": args.heads,
            "heads_kv": args.kv_heads or args.heads, "head_dim": args.head_dim, "dtype": args.dtype,
            "causal": args.causal, "window": False, "softcap": False}
    spec = tunable.spec_for_desc(desc, cc)
    bucket = tuple(tunable.bucket_of(desc))
    runtime_default = tunable.runtime_default or tunable.default_config
    choice = dispatch.explain(spec, bucket, runtime_default, gpu=gpu)
    default = runtime_default(spec)
    print(f"call: batch {args.batch}, seqlen_q {seqlen_q}, seqlen_k {seqlen_k}, heads {desc['heads_q']}/"
          f"{desc['heads_kv']}, head_dim {args.head_dim}, {args.dtype}{', causal' if args.causal else ''}")
    print(f"  spec:   {spec}")
    print(f"  bucket: {dict(zip(tunable.bucket_names, bucket))}")
    print(f"  config: {choice.config}")
    print(f"  why:    {choice.describe()}")
    if choice.record is not None:
        r = choice.record
        print(f"          tuned {r.latency_ms:.4g} ms vs default {r.default_ms:.4g} ms ({r.speedup:.2f}x) on "
              f"{r.gpu_full_name or r.gpu}, {r.evaluations} configs measured, {r.created_at}"
              + ("" if r.timing_valid else " [interpreter timings]"))
    if choice.config != default:
        print(f"  default would be: {default}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="flashcore", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_info = sub.add_parser("info", help="versions, device, caches, tuning DB / bundle, and the config a call runs")
    p_info.add_argument("--gpu", default=None, help="show the lookup for this GPU (default: the detected one)")
    p_info.add_argument("--template", default="attn_fwd")
    p_info.add_argument("--batch", type=int, default=1)
    p_info.add_argument("--seqlen", type=int, default=None, help="seqlen_q = seqlen_k")
    p_info.add_argument("--seqlen-q", type=int, default=None)
    p_info.add_argument("--seqlen-k", type=int, default=None)
    p_info.add_argument("--heads", type=int, default=32, help="query heads")
    p_info.add_argument("--kv-heads", type=int, default=None, help="key/value heads (GQA), default = heads")
    p_info.add_argument("--head-dim", type=int, default=128)
    p_info.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    p_info.add_argument("--causal", action="store_true")
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
