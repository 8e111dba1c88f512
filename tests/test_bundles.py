"""Tuning bundles: reviewable JSON with checksum and provenance; export / import / merge round trips."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from flashcore import dispatch, ops
from flashcore.generator import KernelSpec
from flashcore.tools import tune
from flashcore.tuning_db import (BundleError, Record, TuningDB, make_bundle, merge_bundles, read_bundle,
                                 write_bundle)
from flashcore.ops.attn_fwd.host import build_spec
from flashcore.tuning_db.bundle import bundle_dir

SPEC = build_spec(90, "bf16", 128)
SPEC_KEY = SPEC.key()


def rec(bucket=(1024, 1024, 64), gpu="h100", latency=1.0, created="2026-01-01T00:00:00Z", thash="aaaa",
        config=None) -> Record:
    return Record(gpu=gpu, template="attn_fwd", template_hash=thash, spec=SPEC_KEY, bucket=tuple(bucket),
                  config=config or {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3,
                                    "WARP_SPECIALIZE": 0},
                  latency_ms=latency, metric=400.0, default_ms=1.2, trials=24, evaluations=16,
                  created_at=created, triton_version="3.6.0", gpu_full_name="NVIDIA H100 80GB HBM3")


def test_bundle_round_trip_is_reviewable(tmp_path):
    records = [rec((4096, 4096, 64)), rec((512, 512, 32), latency=0.02)]
    bundle = make_bundle("h100", records, sources=["somewhere.db"])
    path = write_bundle(bundle, tmp_path / "h100.json")
    text = path.read_text()
    assert json.loads(text)["checksum"].startswith("sha256:")
    assert text.count("\n") >= 8                   # one record per line, header fields on their own lines
    loaded, back = read_bundle(path, expect_gpu="h100")
    assert loaded["schema"] == 1 and loaded["gpu"] == "h100"
    assert loaded["provenance"]["records"] == 2 and loaded["provenance"]["sources"] == ["somewhere.db"]
    assert sorted(back, key=lambda r: r.bucket) == sorted(records, key=lambda r: r.bucket)
    assert list(back[0].config) == ["BLOCK_M", "BLOCK_N", "num_warps", "num_stages", "WARP_SPECIALIZE"]


def test_bad_bundles_are_rejected(tmp_path):
    good = make_bundle("h100", [rec()])
    path = tmp_path / "h100.json"

    tampered = json.loads(json.dumps(good))
    tampered["records"][0]["config"]["BLOCK_M"] = 256
    write_bundle(tampered, path)
    with pytest.raises(BundleError, match="checksum"):
        read_bundle(path)

    path.write_text(write_bundle(good, path).read_text()[:-40])
    with pytest.raises(BundleError, match="corrupt"):
        read_bundle(path)

    write_bundle(good, path)
    with pytest.raises(BundleError, match="a100"):
        read_bundle(path, expect_gpu="a100")

    path.write_text(json.dumps({"hello": "world"}))
    with pytest.raises(BundleError, match="not a flashcore tuning bundle"):
        read_bundle(path)

    newer = dict(good, schema=99)
    path.write_text(json.dumps(newer))
    with pytest.raises(BundleError, match="newer"):
        read_bundle(path)

    with pytest.raises(BundleError, match="a100"):
        make_bundle("h100", [rec(gpu="a100")])
    foreign_record = json.loads(json.dumps(good))
    foreign_record["records"][0]["gpu"] = "a100"
    from flashcore.tuning_db.bundle import checksum
    foreign_record["checksum"] = checksum(foreign_record["records"])
    path.write_text(json.dumps(foreign_record))
    with pytest.raises(BundleError, match="a100"):
        read_bundle(path)


def test_merge_keeps_the_faster_record_and_refuses_mixed_gpus(tmp_path):
    a = write_bundle(make_bundle("h100", [rec((1, 1, 1), latency=2.0), rec((2, 2, 2), latency=1.0)]),
                     tmp_path / "a.json")
    b = write_bundle(make_bundle("h100", [rec((1, 1, 1), latency=1.5, created="2026-02-01T00:00:00Z"),
                                          rec((3, 3, 3))]), tmp_path / "b.json")
    merged = merge_bundles([a, b])
    by_bucket = {tuple(r["bucket"]): r for r in merged["records"]}
    assert set(by_bucket) == {(1, 1, 1), (2, 2, 2), (3, 3, 3)}
    assert by_bucket[(1, 1, 1)]["latency_ms"] == 1.5
    newest = merge_bundles([b, a], prefer="newest")
    assert {tuple(r["bucket"]): r["latency_ms"] for r in newest["records"]}[(1, 1, 1)] == 1.5
    c = write_bundle(make_bundle("a100", [rec(gpu="a100")]), tmp_path / "c.json")
    with pytest.raises(BundleError, match="different GPUs"):
        merge_bundles([a, c])


def test_cli_export_import_merge_round_trip(tmp_path, capsys):
    db1 = tmp_path / "one.db"
    with TuningDB(db1) as db:
        from flashcore.ops.attn_fwd import OP
        current = OP.version_of(SPEC)
        db.put_many([rec((512, 512, 32), thash=current), rec((2048, 2048, 128), thash=current, latency=0.5),
                     rec((8192, 8192, 32), thash="stale0000"), rec((512, 512, 32), gpu="a100", thash=current)])
    out = tmp_path / "bundles"
    assert tune.main(["export", "--db", str(db1), "-o", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["a100.json", "h100.json"]
    _, h100 = read_bundle(out / "h100.json", expect_gpu="h100")
    assert {r.bucket for r in h100} == {(512, 512, 32), (2048, 2048, 128)}      # stale record left out
    assert "old op versions" in capsys.readouterr().out

    db2 = tmp_path / "two.db"
    assert tune.main(["import", str(out / "h100.json"), "--db", str(db2)]) == 0
    with TuningDB(db2, readonly=True) as db:
        assert sorted(db.records(), key=lambda r: r.bucket) == sorted(h100, key=lambda r: r.bucket)
    # importing again changes nothing; a slower record does not replace a faster one
    assert tune.main(["import", str(out / "h100.json"), "--db", str(db2)]) == 0
    slower = write_bundle(make_bundle("h100", [rec((2048, 2048, 128), thash=current, latency=9.0)]),
                          tmp_path / "slower.json")
    assert tune.main(["import", str(slower), "--db", str(db2)]) == 0
    with TuningDB(db2, readonly=True) as db:
        assert db.get("h100", h100[0].spec, current, (2048, 2048, 128)).latency_ms == 0.5

    second = write_bundle(make_bundle("h100", [rec((16384, 16384, 32), thash=current)]), tmp_path / "second.json")
    merged = tmp_path / "merged.json"
    assert tune.main(["merge", str(out / "h100.json"), str(second), "-o", str(merged)]) == 0
    _, records = read_bundle(merged, expect_gpu="h100")
    assert {r.bucket for r in records} == {(512, 512, 32), (2048, 2048, 128), (16384, 16384, 32)}
    assert tune.main(["merge", str(out / "h100.json"), str(out / "a100.json"), "-o", str(merged)]) == 2

    # a current record whose config the op rejects: skipped and counted, or with --strict the whole bundle refused
    bad = write_bundle(make_bundle("h100", [rec((256, 256, 32), thash=current),
                                            rec((128, 128, 32), thash=current, config={"BLOCK_M": 64})]),
                       tmp_path / "bad.json")
    strict_db = tmp_path / "strict.db"
    capsys.readouterr()
    assert tune.main(["import", "--strict", str(bad), "--db", str(strict_db)]) == 1
    assert "rejected attn_fwd" in capsys.readouterr().out
    with TuningDB(strict_db, readonly=True) as db:
        assert list(db.records()) == []
    assert tune.main(["import", str(bad), "--db", str(strict_db)]) == 0
    assert "imported 1 of 2 records, 1 skipped" in capsys.readouterr().out
    with TuningDB(strict_db, readonly=True) as db:
        assert [r.bucket for r in db.records()] == [(256, 256, 32)]

    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text("{not json")
    assert tune.main(["import", str(corrupt), "--db", str(db2)]) == 2


def test_shipped_bundles_are_valid_and_packaged():
    """Every bundle shipped in tuning_db/bundles/ reads cleanly for its GPU; pyproject ships the folder."""
    folder = bundle_dir()
    for path in folder.glob("*.json"):
        bundle, records = read_bundle(path, expect_gpu=path.stem)
        assert records, f"{path} has no records"
    pyproject = (Path(__file__).resolve().parent.parent / "pyproject.toml").read_text()
    assert '"bundles/*.json"' in pyproject


def test_every_shipped_record_is_current_and_dispatch_serves_it(monkeypatch):
    """Each record of a shipped bundle carries its spec's current version (the hash of the code the spec runs), so
    dispatch on that GPU runs its config. A template or macro edit that changes the code of a shipped spec fails
    here: the bundle's records for it are stale (retune them, or drop them)."""
    monkeypatch.setenv("FLASHCORE_TUNING_DB", "off")           # the bundle alone
    monkeypatch.delenv("FLASHCORE_BUNDLE_DIR", raising=False)
    monkeypatch.delenv("FLASHCORE_TUNING", raising=False)
    dispatch.clear()
    try:
        for path in bundle_dir().glob("*.json"):
            _, records = read_bundle(path, expect_gpu=path.stem)
            stale = [f"{r.template} {r.spec} {r.bucket}" for r in records
                     if r.template_hash != ops.current_version(r.template, r.spec)]
            assert not stale, f"{path.name}: {len(stale)} stale records, e.g. {stale[0]}"
            for r in records:
                choice = dispatch.explain(ops.get(r.template), KernelSpec.from_key(r.spec), r.bucket, gpu=path.stem)
                assert (choice.source, choice.config) == ("bundle", r.config), (path.name, r.spec, r.bucket)
    finally:
        dispatch.clear()


def test_prune_deletes_the_records_not_current_for_their_spec(tmp_path, capsys):
    """Per spec: a record is kept iff it carries its own spec's current version; a spec that no longer renders (an
    op or a feature this flashcore lacks) has only stale records."""
    from flashcore.ops.attn_fwd import OP
    other = build_spec(90, "bf16", 64, causal=True)
    unknown_op = json.dumps({"op": "gone", "arch": 90})
    lacking = json.dumps({"op": "attn_fwd", "arch": 90})       # the template needs features it lacks
    db_path = tmp_path / "t.db"
    keep = [rec(thash=OP.version_of(SPEC)), rec((512, 512, 32), thash=OP.version_of(SPEC))]
    keep.append(dataclasses.replace(rec(thash=OP.version_of(other)), spec=other.key()))
    drop = [rec((4096, 4096, 64), thash=OP.version_of(other)),            # another spec's version
            dataclasses.replace(rec(thash=OP.version_of(SPEC)), spec=lacking),
            dataclasses.replace(rec(thash=OP.version_of(SPEC)), template="gone", spec=unknown_op)]
    with TuningDB(db_path) as db:
        db.put_many(keep + drop)
    assert tune.main(["prune", "--db", str(db_path)]) == 0
    assert "removed 3 stale records" in capsys.readouterr().out
    with TuningDB(db_path, readonly=True) as db:
        assert sorted(r.key for r in db.records()) == sorted(r.key for r in keep)


@pytest.mark.parametrize("command", ["show", "export", "prune"])
def test_cli_on_a_corrupt_db_is_a_one_line_error(tmp_path, capsys, command):
    bad = tmp_path / "bad.db"
    bad.write_bytes(b"this is not sqlite" * 100)
    assert tune.main([command, "--db", str(bad)]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
