"""`flashcore`: small commands around the runtime (what would run, and what its source is)."""
from __future__ import annotations

import argparse
import sys

import torch

from . import __version__, ops
from .device import arch, gpu_name, interpreter_mode
from .generator import KernelSpec, cache_dir, parse_feature_value, render, source_hash


class UsageError(Exception):
    """A bad argument: one line on stderr, exit status 2."""


def _arch(args) -> int:
    """Compute capability the command is about: --gpu's, else this machine's (0: the interpreter / no GPU)."""
    from .tuning import GPU_ARCH
    if getattr(args, "gpu", None):
        if args.gpu not in GPU_ARCH:
            raise UsageError(f"--gpu {args.gpu!r}: known GPUs are {', '.join(sorted(GPU_ARCH))}")
        return GPU_ARCH[args.gpu]
    return arch() if torch.cuda.is_available() or interpreter_mode() else 0


def _op(name: str):
    try:
        return ops.get(name)
    except KeyError as e:
        raise UsageError(str(e).strip("'\"")) from None


def cmd_gen(args) -> int:
    """Print the rendered Triton source of a spec, e.g. `flashcore gen --show head_dim=128 causal=true`.

    NAME=VALUE items set fields of the op's call (head_dim=80 causal=true), and the spec is what this machine
    runs for that call (on an H100: the TMA variant where it applies); items naming other features force them
    (tma=false). A name the op does not have, or a value of another type, is an error."""
    op = _op(args.op)
    call_fields = {f.name for f in op.call_fields()}
    call_items = [i for i in args.features if i.partition("=")[0] in call_fields]
    try:
        call = ops.parse_call(op, call_items)
    except (ValueError, TypeError) as e:
        raise UsageError(str(e)) from None
    features = op.spec_of(call, _arch(args)).as_dict()     # e.g. head_dim=80 turns TMA off, as at runtime
    for item in args.features:
        name, sep, text = item.partition("=")
        if name in call_fields and name not in features:
            continue
        if not sep or name not in features:
            names = sorted(set(features) | call_fields)
            raise UsageError(f"{item!r}: expected NAME=VALUE with NAME one of {', '.join(names)}")
        value = parse_feature_value(text)
        if type(value) is not type(features[name]):
            raise UsageError(f"{item!r}: {name} takes {type(features[name]).__name__} values "
                             f"(e.g. {name}={str(features[name]).lower()})")
        if name not in call_fields:     # a feature the call does not decide (tma=false, arch=80): forced
            features[name] = value
    spec = KernelSpec.make(op.name, **features)
    templates = [args.template] if args.template else list(op.kernels)
    unknown = set(templates) - set(op.kernels)
    if unknown:
        raise UsageError(f"--template {args.template!r}: {op.name} renders {', '.join(op.kernels)}")
    for template in templates:
        try:
            source = render(spec, template)
        except Exception as e:    # a feature value the template cannot render (e.g. head_dim=0)
            raise UsageError(f"cannot render {template} for {spec}: {type(e).__name__}: {e}") from None
        if args.show:
            sys.stdout.write(source)
        else:
            print(f"{spec}\n  {template}: {cache_dir() / (template + '_' + source_hash(spec, template) + '.py')}")
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
    """Which tuning DB and bundle dispatch uses, their record counts, and (with a call) the config that runs."""
    from . import dispatch
    from .tuning_db import BundleError, TuningDBError, TuningDB, bundle_path, read_bundle, user_db_path

    op = _op(args.op)
    gpu = args.gpu or dispatch.current_gpu()
    cc = _arch(args)
    call = None
    if args.fields:
        try:
            call = ops.parse_call(op, args.fields)
        except (ValueError, TypeError) as e:
            raise UsageError(str(e)) from None
    print(f"tuning: records for GPU {gpu!r}, op {op.name}"
          + ("" if dispatch.tuning_enabled() else "  (FLASHCORE_TUNING=off: heuristic defaults only)"))

    def describe(records) -> str:
        mine = [r for r in records if r.gpu == gpu and r.template == op.name]
        current = sum(1 for r in mine if r.template_hash == ops.current_version(op.name, r.spec))
        return (f"{len(records)} records; {len(mine)} for {gpu} {op.name}: {current} current, "
                f"{len(mine) - current} stale (made for other code of their spec, never used)")

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

    if call is None:
        fields = ", ".join(f.name for f in op.call_fields())
        print(f"  (give the call's fields as NAME=VALUE to see which config runs: {fields})")
        return
    spec = op.spec_of(call, cc)
    bucket = op.bucket_of(call)
    choice = dispatch.explain(op, spec, bucket, gpu=gpu)
    default = op.default_config(spec)
    print(f"call: {call.describe() if hasattr(call, 'describe') else call}")
    print(f"  spec:   {spec}, version {op.version_of(spec)}")
    print(f"  bucket: {dict(zip(op.bucket_names, bucket))}")
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
    p_info.add_argument("--op", default="attn_fwd", help=f"one of: {', '.join(ops.names())}")
    p_info.add_argument("--gpu", default=None, help="show the lookup for this GPU (default: the detected one)")
    p_info.add_argument("fields", nargs="*", metavar="FIELD=VALUE",
                        help="the call, e.g. batch=2 seqlen_q=4096 seqlen_k=4096 heads_q=32 heads_kv=8 causal=true")
    p_info.set_defaults(func=cmd_info)
    p_gen = sub.add_parser("gen", help="render an op's kernels for a spec")
    p_gen.add_argument("--op", default="attn_fwd", help=f"one of: {', '.join(ops.names())}")
    p_gen.add_argument("--template", default=None, help="one of the op's kernels (default: all of them)")
    p_gen.add_argument("--gpu", default=None, help="render for this GPU (default: what this machine runs)")
    p_gen.add_argument("features", nargs="*", help="NAME=VALUE feature overrides, e.g. head_dim=80 causal=true")
    p_gen.add_argument("--show", action="store_true", help="print the rendered source")
    p_gen.set_defaults(func=cmd_gen)
    args = parser.parse_args(argv)
    try:
        status = args.func(args)
        sys.stdout.flush()      # here, not at exit, so that a reader gone is caught below
        return status
    except BrokenPipeError:
        if argv is not None:    # called from Python: the caller's stdout, not ours to redirect
            raise
        # stdout's reader is gone (`flashcore info | head`): stop quietly, stdout pointed at /dev/null so that
        # Python's flush at exit does not fail again (Python's documented idiom)
        import os
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except UsageError as e:
        print(f"flashcore {args.command}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
