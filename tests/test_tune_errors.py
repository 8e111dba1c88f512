"""flashcore-tune when things around it fail: a tuning DB it cannot write (checked before anything is measured;
a write failing mid-run fails the bucket and the run), a directory given as the DB (tuner and dispatch), a reader
that goes away (`| head`); and a summary table whose rows are told apart and give no GPU rates under the
interpreter."""
from __future__ import annotations

import contextlib
import shutil
import sqlite3
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import sqlite_utils

from flashcore import dispatch
from flashcore.ops.attn_fwd import OP as ATTN_FWD
from flashcore.ops.attn_fwd.host import build_spec
from flashcore.tools import tune
from flashcore.tools.tune_common import short_spec
from flashcore.tools.tuner import BucketResult
from flashcore.tuning_db import TuningDB, TuningWarning

interpreter = pytest.mark.usefixtures("cpu_only")

PLAN = ["--kernels", "attn_fwd", "--feature", "causal=false", "--buckets", "32x32x2", "--trials", "1"]


@pytest.fixture
def paths(tmp_path, monkeypatch):
    monkeypatch.setenv("FLASHCORE_BUNDLE_DIR", str(tmp_path / "no-bundles"))
    monkeypatch.setenv("FLASHCORE_TUNING_DB", str(tmp_path / "user.db"))
    dispatch.clear()
    dispatch.forget_warnings()
    (tmp_path / "dbs").mkdir()              # the DB's own folder, made unwritable apart from the studies'
    yield {"db": tmp_path / "dbs" / "tuning.db", "storage": tmp_path / "studies.sqlite3", "tmp": tmp_path}
    dispatch.clear()


def run_tune(paths, *extra, db=None):
    """flashcore-tune on the interpreter; `db` None: no --db (the DB from the environment)."""
    db_args = [] if db is None else ["--db", str(db)]
    return tune.main(["--interpret", "--quiet", "--storage", f"sqlite:///{paths['storage']}", *db_args, *PLAN,
                      *extra])


def permissions_bind(folder: Path) -> bool:
    """Whether file permissions stop this process's writes: not root's (unless it lacks CAP_DAC_OVERRIDE)."""
    probe = folder / "read-only-probe"
    probe.touch(mode=0o444)
    try:
        probe.open("a").close()
        return False
    except PermissionError:
        return True
    finally:
        probe.unlink()


@contextlib.contextmanager
def unwritable(path: Path):
    """`path` (a file or folder) made unwritable for this process: by its permissions, or where they do not stop
    it (root) by the immutable flag, which stops root too."""
    if permissions_bind(path.parent):
        mode = path.stat().st_mode
        path.chmod(mode & ~0o222)
        try:
            yield
        finally:
            path.chmod(mode)
        return
    flagged = shutil.which("chattr") and subprocess.run(["chattr", "+i", str(path)], capture_output=True)
    if not flagged or flagged.returncode:
        pytest.skip("permissions do not stop this process (root) and `chattr +i` is not possible here "
                    f"({flagged.stderr.decode().strip() if flagged else 'no chattr'})")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


# --------------------------------------------------------------------------- a DB that cannot be written

@interpreter
@pytest.mark.parametrize("what", ["file", "folder", "folder-new-db"])
def test_an_unwritable_db_stops_the_run_before_anything_is_measured(paths, capsys, what):
    db = paths["db"]
    if what != "folder-new-db":
        TuningDB(db).close()                    # an existing DB (no -wal/-shm files left once closed)
    with unwritable(db if what == "file" else db.parent):
        code = run_tune(paths, db=db)
    out, err = capsys.readouterr()
    assert code == 2, out + err
    assert err.count("\n") == 1 and str(db) in err and "(--db)" in err and "not writable" in err, err
    assert "buckets tuned" not in out
    assert not paths["storage"].exists()      # no study started: nothing measured


@interpreter
def test_a_record_write_failing_mid_run_fails_the_bucket_and_the_run(paths, capsys, monkeypatch):
    """The DB passed the check, then refuses the record (e.g. the disk filled up): the bucket is failed, not
    tuned, and the run exits non-zero; also where the studies already hold the record (another DB's run)."""
    def disk_full(self, *args, **kwargs):
        raise sqlite3.OperationalError("database or disk is full")
    monkeypatch.setattr(sqlite_utils.db.Table, "upsert_all", disk_full)
    assert run_tune(paths, db=paths["db"]) == 1
    out = capsys.readouterr().out
    assert "0/1 buckets tuned, 1 failed" in out and "record not written" in out and "disk is full" in out, out
    with TuningDB(paths["db"], readonly=True) as db:
        assert db.records() == []

    monkeypatch.undo()
    other = paths["tmp"] / "other.db"
    assert run_tune(paths, db=other) == 0          # measures the bucket, records it in the studies too
    capsys.readouterr()
    monkeypatch.setattr(sqlite_utils.db.Table, "upsert_all", disk_full)
    assert run_tune(paths, db=paths["db"]) == 1    # found done in the studies: copying it into this DB fails
    out = capsys.readouterr().out
    assert "0/1 buckets tuned, 1 failed" in out and "cached" not in out, out


# ------------------------------------------------------------------------------- a directory as the DB

@interpreter
@pytest.mark.parametrize("given", ["--db", "$FLASHCORE_TUNING_DB"])
def test_a_directory_as_the_db_is_named_a_directory(paths, capsys, monkeypatch, given):
    folder = paths["tmp"] / "dbdir"
    folder.mkdir()
    if given == "--db":
        code = run_tune(paths, db=folder)
    else:
        monkeypatch.setenv("FLASHCORE_TUNING_DB", str(folder))
        code = run_tune(paths)
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert f"({given})" in err and f"{folder}: is a directory; expected a tuning DB file" in err, err
    assert not paths["storage"].exists()
    assert tune.main(["show", "--db", str(folder)]) == 2
    assert "is a directory" in capsys.readouterr().err


def test_dispatch_warns_once_that_the_db_is_a_directory_and_falls_back(paths, monkeypatch):
    folder = paths["tmp"] / "dbdir"
    folder.mkdir()
    monkeypatch.setenv("FLASHCORE_TUNING_DB", str(folder))
    spec = build_spec(90, "bf16", 128, causal=True)
    with pytest.warns(TuningWarning, match=f"{folder}: is a directory"):
        assert dispatch.explain(ATTN_FWD, spec, (1024, 1024, 64), gpu="h100").source == "default"
    dispatch.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")                            # once per file
        assert dispatch.explain(ATTN_FWD, spec, (1024, 1024, 64), gpu="h100").source == "default"


# ----------------------------------------------------------------------------------- a reader gone away

@pytest.mark.parametrize("argv", [["-m", "flashcore.tools.tune", "show"],
                                  ["-m", "flashcore.tools.tune", "--interpret", "--dry-run"],
                                  ["-m", "flashcore.cli", "info"]], ids=["tune-show", "tune-dry-run", "info"])
def test_output_into_a_closed_pipe_ends_quietly(paths, argv):
    """`flashcore-tune show | head`: head exits after its lines; the writer stops without a traceback."""
    TuningDB(paths["db"]).close()
    proc = subprocess.Popen([sys.executable, *argv] + (["--db", str(paths["db"])] if "show" in argv else []),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()                         # the reader is gone before the first line
    err = proc.stderr.read()
    assert proc.wait() == 1 and "BrokenPipeError" not in err and "Traceback" not in err, err


# ------------------------------------------------------------------------------------- the summary table

def interpreter_result(spec: str) -> BucketResult:
    config = {"BLOCK_N": 16, "num_warps": 4}
    return BucketResult("attn_decode", spec, (4, 64, 1), {}, "tuned", default_config=config, default_ms=2.0,
                        config=config, ms=1.0, metric=1e-3, metric_unit="GB/s", evaluations=4, feasible=4,
                        timing_valid=False)


def test_the_table_tells_rows_apart_and_gives_no_gpu_rate_under_the_interpreter(capsys):
    common = '"dtype":"fp16","gqa_group":2,"head_dim":32,"op":"attn_decode"'
    rows = [interpreter_result(f'{{"causal":{causal},{common},"page_size":{page}}}')
            for causal in ("false", "true") for page in (0, 16)]
    tune.print_table(rows, interpret=True)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("attn_decode")]
    assert len(lines) == 4
    for r, line in zip(rows, lines):
        assert f" {short_spec(r.spec)} " in line, line              # whole: page size and causal both shown
    assert tune._result_line(rows[0]).count("n/a") == 1 and "GB/s" not in tune._result_line(rows[0])
    summary = tune.summarize(rows, 1.0, "interpreter", True)
    markdown = tune.tune_markdown(rows, summary, "t")
    assert "| n/a |" in markdown and "GB/s" not in markdown
