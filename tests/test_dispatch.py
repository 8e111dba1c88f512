"""Runtime dispatch: lookup chain, nearest bucket, invalidation, unusable files, the memoized hot path."""
from __future__ import annotations

import sqlite3
import warnings

import pytest

from flashcore import cli, dispatch
from flashcore.ops.attn_fwd import OP
from flashcore.ops.attn_fwd.host import build_spec, default_config
from flashcore.tuning_db import Record, TuningDB, TuningWarning, make_bundle, write_bundle

GPU = "h100"
SPEC = build_spec(90, "bf16", 128, causal=True)
THASH = OP.version_of(SPEC)
DEFAULT = default_config(SPEC)


def cfg(block_m, block_n=64, warps=None, stages=2):
    warps = warps or (8 if block_m >= 256 else 4)
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "num_warps": warps, "num_stages": stages, "WARP_SPECIALIZE": 0}


def rec(bucket, config, gpu=GPU, thash=THASH, spec=SPEC) -> Record:
    return Record(gpu=gpu, template="attn_fwd", template_hash=thash, spec=spec.key(), bucket=tuple(bucket),
                  config=config, latency_ms=1.0, default_ms=1.2, default_config=DEFAULT)


@pytest.fixture
def env(tmp_path, monkeypatch):
    """A private user DB path and bundle folder; dispatch forgets everything before and after."""
    db_path, bundles = tmp_path / "user.db", tmp_path / "bundles"
    bundles.mkdir()
    monkeypatch.setenv("FLASHCORE_TUNING_DB", str(db_path))
    monkeypatch.setenv("FLASHCORE_BUNDLE_DIR", str(bundles))
    monkeypatch.delenv("FLASHCORE_TUNING", raising=False)
    dispatch.clear()
    yield db_path, bundles
    dispatch.clear()


def put(db_path, *records):
    with TuningDB(db_path) as db:
        db.put_many(records)


def ship(bundles, *records, gpu=GPU):
    write_bundle(make_bundle(gpu, records), bundles / f"{gpu}.json")


def explain(bucket, gpu=GPU, spec=SPEC):
    return dispatch.explain(OP, spec, tuple(bucket), gpu=gpu)


def test_chain_user_db_then_bundle_then_nearest_then_default(env):
    db_path, bundles = env
    assert explain((1024, 1024, 64)).source == "default"          # nothing anywhere, silently
    ship(bundles, rec((1024, 1024, 64), cfg(64)), rec((4096, 4096, 64), cfg(128)))
    dispatch.clear()
    assert explain((1024, 1024, 64)).config == cfg(64)
    assert explain((1024, 1024, 64)).source == "bundle"
    put(db_path, rec((1024, 1024, 64), cfg(256)))
    dispatch.clear()
    choice = explain((1024, 1024, 64))
    assert (choice.source, choice.config, choice.origin) == ("user DB", cfg(256), str(db_path))
    assert explain((4096, 4096, 64)).source == "bundle"           # the user DB lacks that bucket
    near = explain((8192, 8192, 64))
    assert (near.source, near.bucket, near.config) == ("nearest bucket", (4096, 4096, 64), cfg(128))
    # another spec (features differ): no record is near enough, the default
    other = build_spec(90, "bf16", 64, causal=True)
    assert dispatch.explain(OP, other, (1024, 1024, 64), gpu=GPU).source == "default"


def test_nearest_bucket_is_log2_nearest_and_user_db_wins_ties(env):
    db_path, bundles = env
    put(db_path, rec((512, 512, 32), cfg(64)), rec((8192, 8192, 32), cfg(128)))
    ship(bundles, rec((2048, 2048, 32), cfg(256)), rec((512, 512, 64), cfg(64, 32)))
    assert explain((1024, 1024, 32)).bucket in ((512, 512, 32), (2048, 2048, 32))   # both 2 steps away
    assert explain((1024, 1024, 32)).config == cfg(64)            # tie: the user DB's
    assert explain((4096, 4096, 32)).bucket == (8192, 8192, 32)   # tie again: the user DB's
    assert explain((2048, 4096, 32)).bucket == (2048, 2048, 32)   # 1 step vs 3
    assert explain((16384, 16384, 32)).bucket == (8192, 8192, 32)
    assert explain((512, 512, 128)).bucket == (512, 512, 64)


def test_other_gpus_and_old_template_versions_are_never_used(env):
    db_path, bundles = env
    put(db_path, rec((1024, 1024, 64), cfg(64), gpu="a100"), rec((1024, 1024, 64), cfg(64), thash="0ld0ld0ld0ld0ld0"))
    ship(bundles, rec((1024, 1024, 64), cfg(64), gpu="a100"), gpu="a100")
    assert explain((1024, 1024, 64)).source == "default"
    assert explain((1024, 1024, 64), gpu="a100").config == cfg(64)
    # a bundle file named for this GPU but holding another GPU's records is foreign
    write_bundle(make_bundle("a100", [rec((1024, 1024, 64), cfg(64), gpu="a100")]), bundles / "h100.json")
    dispatch.clear()
    with pytest.warns(TuningWarning, match="a100"):
        assert explain((1024, 1024, 64)).source == "default"


def test_a_stale_record_neither_serves_nor_shadows_a_current_one(env):
    """Records are current per spec: a stale record of the same spec and bucket (made for other code) does not hide
    the current one, nor serve as a nearer neighbour; another spec's records keep their own version."""
    db_path, bundles = env
    other = build_spec(90, "bf16", 64, causal=True)
    stale = "0ld0ld0ld0ld0ld0"
    put(db_path, rec((1024, 1024, 64), cfg(256), thash=stale), rec((1024, 1024, 64), cfg(64)),
        rec((2048, 2048, 64), cfg(32), thash=stale), rec((8192, 8192, 64), cfg(128)),
        rec((1024, 1024, 64), cfg(32), spec=other, thash=OP.version_of(other)))
    assert explain((1024, 1024, 64)).config == cfg(64)
    assert explain((2048, 2048, 64)).bucket == (1024, 1024, 64)       # not the stale record of its own bucket
    assert explain((1024, 1024, 64), spec=other).config == cfg(32)
    assert OP.version_of(other) != THASH


@pytest.mark.parametrize("kind", ["corrupt", "foreign", "newer", "empty"])
def test_unusable_user_db_warns_once_and_falls_back(env, kind):
    db_path, bundles = env
    ship(bundles, rec((1024, 1024, 64), cfg(64)))
    if kind == "corrupt":
        db_path.write_bytes(b"\x00garbage" * 512)
    elif kind == "foreign":
        conn = sqlite3.connect(db_path)
        conn.execute("CREATE TABLE notes (text TEXT)")
        conn.commit()
        conn.close()
    elif kind == "newer":
        put(db_path, rec((1024, 1024, 64), cfg(256)))
        conn = sqlite3.connect(db_path)
        conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
        conn.commit()
        conn.close()
    else:
        db_path.write_bytes(b"")
    with pytest.warns(TuningWarning, match="ignoring the tuning DB"):
        assert explain((1024, 1024, 64)).source == "bundle"        # the bundle still serves
    dispatch.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")                            # once per file, not per lookup
        assert explain((1024, 1024, 64)).source == "bundle"


def test_locked_db_warns_and_falls_back_quickly(env, monkeypatch):
    db_path, _ = env
    put(db_path, rec((1024, 1024, 64), cfg(256)))
    monkeypatch.setenv("FLASHCORE_DB_TIMEOUT", "0.1")
    holder = sqlite3.connect(db_path, isolation_level=None)
    holder.execute("PRAGMA locking_mode=EXCLUSIVE")
    holder.execute("BEGIN EXCLUSIVE")
    holder.execute("INSERT INTO meta (key, value) VALUES ('x', 'y')")
    try:
        with pytest.warns(TuningWarning, match="locked|ignoring"):
            assert explain((1024, 1024, 64)).source == "default"
    finally:
        holder.execute("ROLLBACK")
        holder.close()


@pytest.mark.parametrize("kind", ["corrupt", "tampered", "truncated"])
def test_unusable_bundle_warns_once(env, kind):
    _, bundles = env
    path = bundles / "h100.json"
    ship(bundles, rec((1024, 1024, 64), cfg(64)))
    if kind == "corrupt":
        path.write_text("[[[")
    elif kind == "tampered":
        path.write_text(path.read_text().replace('"BLOCK_M": 64', '"BLOCK_M": 32'))
    else:
        path.write_text(path.read_text()[: len(path.read_text()) // 2])
    with pytest.warns(TuningWarning, match="ignoring the tuning bundle"):
        assert explain((1024, 1024, 64)).source == "default"
    dispatch.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        explain((1024, 1024, 64))


@pytest.mark.parametrize("bad, why", [
    ({**cfg(64), "BOGUS": 1}, "no tunable 'BOGUS'"),
    ({"BLOCK_M": 64}, "lacks"),
    (cfg(0), "BLOCK_M=0 is not one of"),
    (cfg(8), "BLOCK_M=8 is not one of"),
    (cfg(48), "BLOCK_M=48 is not one of"),
    (cfg(1024), "BLOCK_M=1024 is not one of"),
    (cfg(256, 256, warps=4, stages=4), "shared memory|registers"),      # declared values, but cannot run
    ({**cfg(64), "WARP_SPECIALIZE": 1}, "WARP_SPECIALIZE with 4 warps"),
])
def test_records_with_configs_the_op_cannot_run_are_skipped(env, bad, why):
    db_path, _ = env
    put(db_path, rec((1024, 1024, 64), bad))
    with pytest.warns(TuningWarning, match=why):
        assert explain((1024, 1024, 64)).source == "default"


def test_records_with_tunables_of_the_space_are_used(env):
    db_path, _ = env
    ok = {**cfg(64, warps=8), "WARP_SPECIALIZE": 1}
    put(db_path, rec((4096, 4096, 64), ok))
    dispatch.clear()
    assert explain((4096, 4096, 64)).config == ok


def test_a_decode_neighbour_lends_its_tiles_but_not_its_split_count(env):
    """num_splits is a per-bucket tunable: a call in another bucket keeps the neighbour's tiles and takes the split
    heuristic (num_splits 0, the default's); a call in the record's own bucket gets the record whole."""
    from flashcore.ops.attn_decode import OP as DECODE
    from flashcore.ops.attn_decode.host import default_config as decode_default, spec_of
    from flashcore.ops.attn_decode.tuning import call_for
    features = dict(dtype="bf16", head_dim=128, gqa_group=4, page_size=16)
    spec = spec_of(call_for(features, (128, 8192, 1)), 90)
    tuned = {**decode_default(spec), "BLOCK_N": 32, "num_warps": 8, "num_splits": 16}
    put(env[0], Record(gpu=GPU, template="attn_decode", template_hash=DECODE.version_of(spec), spec=spec.key(),
                       bucket=(128, 8192, 1), config=tuned, latency_ms=1.0, default_ms=1.2,
                       default_config=decode_default(spec)))
    assert dispatch.explain(DECODE, spec, (128, 8192, 1), gpu=GPU).config == tuned
    for bucket in ((128, 1024, 1), (32, 8192, 1), (128, 8192, 2)):
        near = dispatch.explain(DECODE, spec, bucket, gpu=GPU)
        assert (near.source, near.bucket, near.config) == ("nearest bucket", (128, 8192, 1), {**tuned, "num_splits": 0})


def test_config_for_memoizes_and_never_raises(env, monkeypatch):
    db_path, _ = env
    put(db_path, rec((1024, 1024, 64), cfg(64)))
    monkeypatch.setattr(dispatch, "current_gpu", lambda: GPU)
    calls = []
    real_explain = dispatch.explain
    monkeypatch.setattr(dispatch, "explain", lambda *a, **k: calls.append(1) or real_explain(*a, **k))
    first = dispatch.config_for(OP, SPEC, (1024, 1024, 64))
    assert first == cfg(64) and len(calls) == 1
    db_path.unlink()                                              # the hot path never looks at files again
    for _ in range(1000):
        assert dispatch.config_for(OP, SPEC, (1024, 1024, 64)) is first
    assert len(calls) == 1
    assert dispatch.last_choice(SPEC, (1024, 1024, 64)).source == "user DB"

    def broken(*a, **k):
        raise RuntimeError("disk on fire")
    monkeypatch.setattr(dispatch, "explain", broken)
    dispatch.forget_warnings()
    with pytest.warns(TuningWarning, match="disk on fire"):
        assert dispatch.config_for(OP, SPEC, (2048, 2048, 64)) == DEFAULT


def test_tuning_off_and_absent_files_are_silent(env, monkeypatch):
    db_path, bundles = env
    put(db_path, rec((1024, 1024, 64), cfg(64)))
    monkeypatch.setenv("FLASHCORE_TUNING", "off")
    assert explain((1024, 1024, 64)).source == "default"
    monkeypatch.delenv("FLASHCORE_TUNING")
    monkeypatch.setenv("FLASHCORE_TUNING_DB", str(db_path.parent / "nope.db"))
    dispatch.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert explain((1024, 1024, 64)).source == "default"
    assert not (db_path.parent / "nope.db").exists()


def test_flashcore_info_shows_sources_and_the_choice(env, capsys):
    db_path, bundles = env
    put(db_path, rec((4096, 4096, 32), cfg(64, 32)))
    ship(bundles, rec((512, 512, 32), cfg(128)), rec((4096, 4096, 32), cfg(256)))
    assert cli.main(["info", "--gpu", "h100", "seqlen_q=3000", "seqlen_k=3000", "causal=true"]) == 0
    out = capsys.readouterr().out
    assert "user DB: " + str(db_path) in out and "1 for h100 attn_fwd: 1 current" in out
    assert "bundle:  " + str(bundles / "h100.json") in out and "2 for h100 attn_fwd: 2 current" in out
    assert "'seqlen_q': 4096" in out and "user DB" in out.split("why:")[1]
    assert "'BLOCK_M': 64, 'BLOCK_N': 32" in out
    assert cli.main(["info", "--gpu", "h100", "seqlen_q=700", "seqlen_k=700", "causal=true"]) == 0
    out = capsys.readouterr().out
    assert "nearest bucket [512, 512, 32]" in out
    assert cli.main(["info", "--gpu", "h100", "seqlen_q=700", "seqlen_k=700"]) == 0   # not causal: default
    assert "heuristic default" in capsys.readouterr().out
