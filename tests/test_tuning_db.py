"""Tuning DB: schema, reads and writes, unusable files, concurrent writers."""
from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import textwrap
import time

import pytest

from flashcore.tuning_db import SCHEMA_VERSION, Record, TuningDB, TuningDBError
from flashcore.tuning_db.db import FORMAT


def make_record(bucket=(1024, 1024, 64), gpu="h100", thash="aaaa", latency=1.0, spec=None, **kw) -> Record:
    spec = spec or json.dumps({"op": "attn_fwd", "arch": 90, "dtype": "bf16", "head_dim": 128},
                              sort_keys=True, separators=(",", ":"))
    config = kw.pop("config", {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3})
    return Record(gpu=gpu, template="attn_fwd", template_hash=thash, spec=spec, bucket=tuple(bucket),
                  config=config, latency_ms=latency, default_ms=1.5, default_config=dict(config), trials=20,
                  evaluations=16, created_at="2026-01-01T00:00:00Z", **kw)


def test_schema_created_versioned_and_wal(tmp_path):
    path = tmp_path / "t.db"
    with TuningDB(path) as db:
        db.put(make_record())
    conn = sqlite3.connect(path)
    meta = dict(conn.execute("SELECT key, value FROM meta"))
    assert meta["format"] == FORMAT and meta["schema_version"] == str(SCHEMA_VERSION)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    columns = {row[1] for row in conn.execute("PRAGMA table_info(records)")}
    for needed in ("gpu", "template", "template_hash", "spec", "bucket", "config", "latency_ms", "metric",
                   "metric_unit", "default_ms", "trials", "evaluations", "flashcore_version", "triton_version",
                   "torch_version", "cuda_version", "gpu_full_name", "created_at"):
        assert needed in columns
    conn.close()


def test_put_get_upsert_and_filters(tmp_path):
    with TuningDB(tmp_path / "t.db") as db:
        db.put(make_record(latency=2.0))
        db.put(make_record(latency=1.0))                      # same key: replaced
        db.put(make_record(bucket=(512, 512, 32)))
        db.put(make_record(gpu="a100"))
        db.put(make_record(thash="bbbb"))
        assert len(db.records()) == 4
        got = db.get("h100", make_record().spec, "aaaa", (1024, 1024, 64))
        assert got.latency_ms == 1.0 and got.bucket == (1024, 1024, 64)
        assert list(got.config) == ["BLOCK_M", "BLOCK_N", "num_warps", "num_stages"]   # order kept
        assert {r.bucket for r in db.records(gpu="h100", template_hash="aaaa")} == {(1024, 1024, 64), (512, 512, 32)}
        assert db.counts()[("h100", "attn_fwd", "aaaa")] == 2
        assert db.prune_stale(lambda template, spec: "aaaa") == 1
        assert all(r.template_hash == "aaaa" for r in db.records())


def test_prune_stale_asks_per_spec(tmp_path):
    """A row stays iff it carries its own spec's current version; a spec with none (it no longer renders) loses all."""
    one, two, gone = (json.dumps({"op": "attn_fwd", "head_dim": d}) for d in (64, 128, 256))
    current = {one: "aaaa", two: "bbbb"}
    with TuningDB(tmp_path / "t.db") as db:
        db.put_many([make_record(spec=one), make_record(spec=one, thash="bbbb"), make_record(spec=two, thash="bbbb"),
                     make_record(spec=two), make_record(spec=gone)])
        assert db.prune_stale(lambda template, spec: current.get(spec)) == 3
        assert {(r.spec, r.template_hash) for r in db.records()} == {(one, "aaaa"), (two, "bbbb")}


def test_record_json_round_trip():
    r = make_record(metric=512.5, timing_valid=False, torch_version="2.11")
    back = Record.from_json(json.loads(json.dumps(r.to_json())))
    assert back == r
    assert r.speedup == pytest.approx(1.5)


def test_readonly_missing_corrupt_foreign_newer(tmp_path):
    with pytest.raises(TuningDBError, match="no such file"):
        TuningDB(tmp_path / "missing.db", readonly=True)
    assert not (tmp_path / "missing.db").exists()            # read-only never creates

    corrupt = tmp_path / "corrupt.db"
    corrupt.write_bytes(b"this is not sqlite at all" * 100)
    with pytest.raises(TuningDBError, match="corrupt"):
        TuningDB(corrupt, readonly=True)
    with pytest.raises(TuningDBError):
        TuningDB(corrupt)

    foreign = tmp_path / "foreign.db"
    conn = sqlite3.connect(foreign)
    conn.execute("CREATE TABLE users (name TEXT)")
    conn.commit()
    conn.close()
    with pytest.raises(TuningDBError, match="not a flashcore tuning DB"):
        TuningDB(foreign, readonly=True)
    with pytest.raises(TuningDBError, match="not a flashcore tuning DB"):
        TuningDB(foreign)                                    # never adopts someone else's file

    newer = tmp_path / "newer.db"
    TuningDB(newer).close()
    conn = sqlite3.connect(newer)
    conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION + 1),))
    conn.commit()
    conn.close()
    with pytest.raises(TuningDBError, match="newer"):
        TuningDB(newer, readonly=True)


def raising(error: str, times: int, then=None):
    """A stand-in method that raises sqlite3.OperationalError(error) on its first `times` calls, then calls `then`."""
    calls = []

    def method(self):
        calls.append(1)
        if len(calls) <= times:
            raise sqlite3.OperationalError(error)
        return then(self)
    return method, calls


def test_a_locked_file_is_retried_until_the_timeout(tmp_path, monkeypatch):
    """SQLite may answer "database is locked" without waiting on the busy timeout (the WAL switch of a file that
    another process is creating): opening retries until the timeout, then names the lock; other errors fail at once."""
    method, calls = raising("database is locked", 2, then=TuningDB._create_or_verify)
    monkeypatch.setattr(TuningDB, "_create_or_verify", method)
    with TuningDB(tmp_path / "t.db", timeout=5) as db:
        db.put(make_record())
        assert len(db.records()) == 1
    assert len(calls) == 3

    method, calls = raising("database is locked", 10 ** 6)
    monkeypatch.setattr(TuningDB, "_create_or_verify", method)
    start = time.monotonic()
    with pytest.raises(TuningDBError, match="locked by another process"):
        TuningDB(tmp_path / "u.db", timeout=0.3)
    assert 0.1 < time.monotonic() - start < 5 and len(calls) > 1

    method, calls = raising("disk I/O error", 10 ** 6)
    monkeypatch.setattr(TuningDB, "_create_or_verify", method)
    with pytest.raises(TuningDBError, match="disk I/O error"):
        TuningDB(tmp_path / "v.db", timeout=5)
    assert len(calls) == 1


WRITER = textwrap.dedent("""
    import sys
    from flashcore.tuning_db import Record, TuningDB

    def make_record(bucket, latency):
        return Record(gpu="h100", template="attn_fwd", template_hash="aaaa", spec='{{"op":"attn_fwd"}}',
                      bucket=bucket, config={{"BLOCK_M": 64}}, latency_ms=latency)

    worker = int(sys.argv[1])
    db = TuningDB(sys.argv[2], timeout=30)
    for i in range(150):
        db.put(make_record(bucket=(worker, i + 1, 1), latency=float(i + 1)))
        db.put(make_record(bucket=(99, 99, 99), latency=float(worker * 1000 + i)))   # both write one key
    db.close()
""")


def test_two_processes_write_one_db(tmp_path):
    path = tmp_path / "shared.db"
    script = tmp_path / "writer.py"
    script.write_text(WRITER.format())
    procs = [subprocess.Popen([sys.executable, str(script), str(w), str(path)]) for w in (1, 2)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    with TuningDB(path, readonly=True) as db:
        records = db.records()
        assert len(records) == 2 * 150 + 1
        assert {r.bucket[0] for r in records} == {1, 2, 99}
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.close()


@pytest.mark.parametrize("change, why", [
    ({"latency_ms": -1.0}, "latency_ms must be a positive"),
    ({"latency_ms": 0.0}, "latency_ms must be a positive"),
    ({"latency_ms": float("nan")}, "latency_ms must be a positive"),
    ({"default_ms": float("inf")}, "default_ms must be a non-negative"),
    ({"config": {"BLOCK_M": True}}, "config must map tunable names to ints"),
    ({"config": {}}, "config is empty"),
])
def test_unusable_records_are_refused_by_writes_and_bundles(tmp_path, change, why):
    import dataclasses
    from flashcore.tuning_db import BundleError, make_bundle, read_bundle, write_bundle
    bad = dataclasses.replace(make_record(), **change)
    with TuningDB(tmp_path / "t.db") as db:
        with pytest.raises(TuningDBError, match=why):
            db.put(bad)
        assert db.records() == []
    # a bundle edited by hand, its checksum recomputed: read_bundle still refuses the record
    path = write_bundle(make_bundle("h100", [make_record()]), tmp_path / "h100.json")
    bundle = json.loads(path.read_text())
    bundle["records"][0].update({k: v for k, v in change.items()})
    from flashcore.tuning_db.bundle import checksum
    bundle["checksum"] = checksum(bundle["records"])
    path.write_text(json.dumps(bundle).replace("NaN", "NaN").replace("Infinity", "Infinity"))
    with pytest.raises(BundleError, match="record #0 is unusable"):
        read_bundle(path)


def test_a_db_whose_folder_is_read_only_is_read_immutable(tmp_path, monkeypatch):
    """On a read-only mount SQLite cannot create the WAL's -shm file ('unable to open database file'): the DB is
    then read as an immutable file, not ignored."""
    with TuningDB(tmp_path / "t.db") as db:
        db.put(make_record())
    real_connect = sqlite3.connect
    uris = []

    def connect(database, *args, **kwargs):
        uris.append(database)
        conn = real_connect(database, *args, **kwargs)
        if "immutable=1" in database:
            return conn
        conn.close()
        return real_connect(str(tmp_path / "missing" / "x.db"), *args, **kwargs)   # fails like a RO mount
    monkeypatch.setattr(sqlite3, "connect", connect)
    with TuningDB(tmp_path / "t.db", readonly=True) as db:
        assert len(db.records()) == 1
    assert uris[-1].endswith("?mode=ro&immutable=1")
