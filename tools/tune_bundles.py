"""flashcore-tune export / import / merge / show / prune: move tuning records between DBs and bundles."""
from __future__ import annotations

import sys
from pathlib import Path

from flashcore.ops import current_version

from .tune_common import _db_path, short_bucket, short_config, short_spec


def is_current(record) -> bool:
    """Whether `record` carries its spec's current version (the hash of the code that spec runs now)."""
    return record.template_hash == current_version(record.template, record.spec)


def cmd_export(args) -> int:
    from flashcore.tuning_db import TuningDB, make_bundle, write_bundle
    db_path = _db_path(args)
    if not db_path.exists():
        print(f"flashcore-tune export: no DB at {db_path}", file=sys.stderr)
        return 1
    with TuningDB(db_path, readonly=True) as db:
        records = db.records(gpu=args.gpu) if args.gpu else db.records()
    if not args.include_stale:
        kept = [r for r in records if is_current(r)]
        if len(kept) < len(records):
            print(f"skipping {len(records) - len(kept)} records of old op versions (--include-stale keeps them)")
        records = kept
    gpus = sorted({r.gpu for r in records}) or ([args.gpu] if args.gpu else [])
    if not gpus:
        print("flashcore-tune export: no records", file=sys.stderr)
        return 1
    out = Path(args.out) if args.out else Path(".")
    if len(gpus) > 1 and out.suffix == ".json":
        print(f"flashcore-tune export: records of several GPUs {gpus}: give --gpu, or a directory for -o",
              file=sys.stderr)
        return 1
    for gpu in gpus:
        bundle = make_bundle(gpu, [r for r in records if r.gpu == gpu], sources=[str(db_path)])
        path = out if out.suffix == ".json" else out / f"{gpu}.json"
        write_bundle(bundle, path)
        print(f"exported {len(bundle['records'])} {gpu} records to {path}")
    return 0


def _runnable(records):
    """(records the op accepts, [(record, why not)]): configs of current-version records are checked against the
    op's declared tunables and feasibility, so a bundle cannot plant a config that breaks every call."""
    from flashcore import ops
    from flashcore.generator import KernelSpec
    kept, rejected = [], []
    for r in records:
        why = None
        if is_current(r):
            try:
                why = ops.get(r.template).check_config(KernelSpec.from_key(r.spec), r.config, tuple(r.bucket))
            except (KeyError, ValueError, TypeError) as e:
                why = f"unreadable spec ({e})"
        (kept if why is None else rejected).append(r if why is None else (r, why))
    return kept, rejected


def cmd_import(args) -> int:
    from flashcore.tuning_db import BundleError, TuningDB, merge_records, read_bundle
    db_path = _db_path(args)
    total = 0
    with TuningDB(db_path) as db:
        for path in args.bundles:
            try:
                _, records = read_bundle(path)
            except BundleError as e:
                print(f"flashcore-tune import: {e}", file=sys.stderr)
                return 2
            records, rejected = _runnable(records)
            for r, why in rejected:
                print(f"  {'rejected' if args.strict else 'skipped'} {r.template} {short_spec(r.spec)} "
                      f"{short_bucket(r.bucket)}: {why}")
            if rejected and args.strict:
                print(f"flashcore-tune import: {path}: {len(rejected)} rejected (--strict), nothing imported from it",
                      file=sys.stderr)
                return 1
            existing = {}
            for r in records:
                old = db.get(r.gpu, r.spec, r.template_hash, r.bucket)
                if old is not None:
                    existing[r.key] = old
            merged = merge_records([existing.values(), records], args.prefer)
            changed = [r for r in merged if r.key not in existing or existing[r.key] is not r]
            db.put_many(changed)
            total += len(changed)
            skipped = f", {len(rejected)} skipped" if rejected else ""
            print(f"imported {len(changed)} of {len(records) + len(rejected)} records{skipped} from {path} "
                  f"into {db_path}")
    return 0


def cmd_merge(args) -> int:
    from flashcore.tuning_db import BundleError, merge_bundles, write_bundle
    try:
        bundle = merge_bundles(args.bundles, args.prefer)
    except BundleError as e:
        print(f"flashcore-tune merge: {e}", file=sys.stderr)
        return 2
    write_bundle(bundle, args.out)
    print(f"merged {len(args.bundles)} bundles: {len(bundle['records'])} {bundle['gpu']} records -> {args.out}")
    return 0


def cmd_show(args) -> int:
    from flashcore.tuning_db import TuningDB
    db_path = _db_path(args)
    if not db_path.exists():
        print(f"no DB at {db_path}")
        return 1
    with TuningDB(db_path, readonly=True) as db:
        records = db.records(gpu=args.gpu)
    print(f"{db_path}: {len(records)} records")
    for r in records:
        stale = not is_current(r)
        print(f"  {r.gpu:11} {r.template:9} {short_spec(r.spec):32} {short_bucket(r.bucket):18} "
              f"{short_config(r.config):14} {r.latency_ms:9.4g} ms  {r.speedup:.3f}x vs default  {r.tuner}"
              + ("  [stale op version]" if stale else "") + ("" if r.timing_valid else "  [interpreter]"))
    return 0


def cmd_prune(args) -> int:
    from flashcore.tuning_db import TuningDB
    with TuningDB(_db_path(args)) as db:
        removed = db.prune_stale(current_version)
    print(f"removed {removed} stale records")
    return 0
