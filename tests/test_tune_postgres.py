"""flashcore-tune workers on several hosts sharing their studies through a PostgreSQL server: one is killed midway
and the other takes its claims over, then that one is killed too, and the first host's next run resumes and
finishes the plan, with every config measured once and every bucket recorded once, as one worker alone would; the
other host's next run copies the same records into its own DB.

The server: $FLASHCORE_TEST_POSTGRES (a postgresql:// URL of a role that may create databases; .ci/run starts one
and sets it), else a throwaway one started from the PostgreSQL binaries of this machine, else these tests skip.
Each test gets a database of its own. "Another host" is a worker in its own pid namespace (`unshare`, root): it
cannot be looked up in /proc from here, so its claims are judged by their heartbeats, as a remote host's are.
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest

from flashcore.tools import tune
from flashcore.tools.tuner import measured
from flashcore.tools.tune_storage import FREED, OWNER, RETRY_OF, machine, make_storage
from flashcore.tuning_db import TuningDB

pytestmark = [pytest.mark.usefixtures("cpu_only"), pytest.mark.skipif(sys.platform != "linux",
                                                                      reason="reads /proc")]

# 2 buckets (causal or not), 9 feasible configs each; the grid measures every one of them, whatever the timings
PLAN = ["--kernels", "attn_fwd", "--buckets", "64x64x4", "--grid"]
GRACE = "8"         # seconds without a heartbeat before another host's claims are taken over


# ------------------------------------------------------------------------------------------------ server

def _server_bin() -> Path | None:
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).resolve().parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(Path(p).parts[-3]))
    return Path(versions[-1]).parent if versions else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def postgres_server():
    """A postgresql:// URL of a server whose role may create databases."""
    url = os.environ.get("FLASHCORE_TEST_POSTGRES")
    if url:
        yield url
        return
    bindir = _server_bin()
    if bindir is None:
        pytest.skip("no PostgreSQL server: set FLASHCORE_TEST_POSTGRES=postgresql://... or install one "
                    "(Debian: apt-get install postgresql); bash .ci/run does both")
    as_user: list[str] = []
    root = Path(tempfile.mkdtemp(prefix="flashcore-test-postgres-"))     # not under pytest's root-only tmp
    if os.geteuid() == 0:                           # initdb refuses root: run the server as Debian's postgres user
        if shutil.which("runuser") is None or subprocess.run(["id", "postgres"], capture_output=True).returncode:
            pytest.skip("PostgreSQL's server cannot run as root and there is no 'postgres' user to run it as")
        shutil.chown(root, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    data, port = root / "data", _free_port()
    subprocess.run([*as_user, str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "flashcore",
                    "--no-sync"], check=True, capture_output=True)
    subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-l", str(root / "log"), "-w", "-o",
                    f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off", "start"],
                   check=True, capture_output=True)
    try:
        yield f"postgresql://flashcore@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def postgres(postgres_server):
    """A fresh database on the server, dropped afterwards: the --storage URL of one test."""
    import psycopg
    name = f"flashcore_test_{uuid.uuid4().hex[:12]}"
    base, _, _ = postgres_server.rpartition("/")
    with psycopg.connect(postgres_server, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield f"{base}/{name}"
    with psycopg.connect(postgres_server, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# ------------------------------------------------------------------------------------------------ hosts

def _can_unshare() -> bool:
    return shutil.which("unshare") is not None and subprocess.run(
        ["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True).returncode == 0


def host_env(tmp: Path, host: str) -> dict[str, str]:
    """A host's environment: its own user cache (default storage, kernels), no shipped bundles."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FLASHCORE_TUNING_DB")}
    env["XDG_CACHE_HOME"] = str(tmp / host / "cache")
    env["FLASHCORE_BUNDLE_DIR"] = str(tmp / "no-bundles")
    return env


def tune_cmd(db: Path, *extra: str, other_host: bool = False) -> list[str]:
    cmd = [sys.executable, "-m", "flashcore.tools.tune", "--interpret", "--quiet", "--db", str(db), *extra]
    return ["unshare", "--pid", "--fork", "--mount-proc", *cmd] if other_host else cmd


def measurements(storage) -> dict[str, Counter]:
    """Study name -> how many measurements of each config it holds."""
    import optuna
    out = {}
    for summary in optuna.get_all_study_summaries(storage):
        study = optuna.load_study(study_name=summary.study_name, storage=storage)
        out[summary.study_name] = Counter(tuple(sorted(t.params.items())) for t in study.trials if measured(t))
    return out


def all_trials(storage) -> list[tuple[str, object]]:
    """(study name, trial) of every trial in the storage."""
    import optuna
    return [(s.study_name, t) for s in optuna.get_all_study_summaries(storage)
            for t in optuna.load_study(study_name=s.study_name, storage=storage).trials]


def _wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the worker ended (rc {proc.returncode}) before {what}: {proc.stdout.read()}")
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def records(db: Path) -> dict[tuple, object]:
    with TuningDB(db, readonly=True) as tdb:
        return {r.key: r for r in tdb.records()}


# ------------------------------------------------------------------------------------------------ tests

def owned_by(owner: str | None, host: str, pid: int) -> bool:
    """Whether a claim's owner is the worker `pid` (a pid of its host) on `host`, this machine or 'other'."""
    if not owner:
        return False
    where, owner_pid, _ = owner.rsplit("|", 2)
    return where != machine() if host == "other" else where == machine() and int(owner_pid) == pid


def stop_holding_a_claim(proc: subprocess.Popen, storage, mine) -> None:
    """Stop the worker `proc` (SIGSTOP to its process group) at a moment it has measured a config and holds a claim
    on another config (not on a final A/B, which has no params); mine(owner) tells its claims."""
    def stopped():
        os.killpg(proc.pid, signal.SIGSTOP)
        trials = [t for _, t in all_trials(storage) if mine(t.user_attrs.get(OWNER))]
        if any(measured(t) for t in trials) and any(t.state.name == "RUNNING" and t.params for t in trials):
            return True
        os.killpg(proc.pid, signal.SIGCONT)
        return False
    _wait_for(stopped, 300, "a worker to measure a config and claim another", proc)


def status_line(url: str) -> str:
    out = subprocess.run([sys.executable, "-m", "flashcore.tools.tune", "status", "--storage", url],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_workers_on_two_hosts_killed_midway_record_every_bucket_once_as_one_worker_would(tmp_path, postgres):
    other = "other" if _can_unshare() else "this"    # else the "other host" is a process of this one (/proc)

    # what one worker alone makes of the plan, on the default storage (an SQLite file, no server)
    alone = subprocess.run(tune_cmd(tmp_path / "alone.db", *PLAN), env=host_env(tmp_path, "alone"),
                           capture_output=True, text=True, timeout=600)
    assert alone.returncode == 0, alone.stdout + alone.stderr
    alone_storage = tmp_path / "alone" / "cache" / "flashcore" / "tune" / "interpreter.sqlite3"    # the default
    alone_studies = measurements(make_storage(f"sqlite:///{alone_storage}"))
    alone_records = records(tmp_path / "alone.db")
    assert len(alone_records) == 2 and all(sum(c.values()) == 9 for c in alone_studies.values())

    shared = [*PLAN, "--storage", postgres, "--grace", GRACE]
    storage = make_storage(postgres)

    def start(host: str, db: str) -> subprocess.Popen:
        return subprocess.Popen(tune_cmd(tmp_path / db, *shared, other_host=host == "other"),
                                env=host_env(tmp_path, db), start_new_session=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    a, b = start("this", "a.db"), start(other, "b.db")
    workers = [a, b]
    try:
        # b dies midway; a takes its claim over (after the grace period: no heartbeat comes), then dies too
        stop_holding_a_claim(b, storage, lambda o: owned_by(o, other, b.pid))
        os.killpg(b.pid, signal.SIGKILL)
        b.wait(timeout=30)
        b_owners = {o for _, t in all_trials(storage) if owned_by(o := t.user_attrs.get(OWNER), other, b.pid)}
        _wait_for(lambda: any(FREED in t.user_attrs and t.user_attrs[OWNER] in b_owners
                              for _, t in all_trials(storage)), 120, "the first worker to free the killed one's claim")
        stop_holding_a_claim(a, storage, lambda o: owned_by(o, "this", a.pid))
        os.killpg(a.pid, signal.SIGKILL)
        a.wait(timeout=30)
        # every worker died: nothing runs; the host of b starts again and resumes, taking a's claim over
        assert "0 running" in status_line(postgres)
        b_again = start(other, "b.db")
        workers.append(b_again)
        out = b_again.communicate(timeout=600)[0]
        assert b_again.returncode == 0 and "2/2 buckets tuned" in out, out
    finally:
        for proc in workers:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)

    # no config measured twice in any study, and the same configs as the worker alone
    studies = measurements(storage)
    assert studies.keys() == alone_studies.keys()
    for name, counts in studies.items():
        assert set(counts.values()) == {1}, f"configs measured twice in {name}: {counts}"
        assert set(counts) == set(alone_studies[name]), name
    # both killed workers' measurements were kept, their claims freed and their configs measured by another
    trials = all_trials(storage)
    assert not any(t.state.name == "RUNNING" for _, t in trials)
    retried = {(n, t.user_attrs[RETRY_OF]) for n, t in trials if t.user_attrs.get(RETRY_OF) is not None}
    for killed in (lambda o: o in b_owners, lambda o: owned_by(o, "this", a.pid)):
        theirs = [(n, t) for n, t in trials if killed(t.user_attrs.get(OWNER))]
        freed = [(n, t) for n, t in theirs if FREED in t.user_attrs]
        assert any(measured(t) for _, t in theirs) and freed and all(t.state.name == "FAIL" for _, t in freed)
        claims = {(n, t.number) for n, t in freed if t.params}           # configs' claims (not a final A/B's)
        assert claims and retried >= claims

    # one record per bucket, of the same kind as the worker alone's: same buckets and specs, every config measured,
    # the same default. Winners are not compared: under the interpreter timings are noise.
    shared_records = records(tmp_path / "b.db")
    assert shared_records.keys() == alone_records.keys()
    for key, record in shared_records.items():
        ref = alone_records[key]
        assert (record.evaluations, record.tuner, record.default_config, record.timing_valid) == \
            (ref.evaluations, ref.tuner, ref.default_config, ref.timing_valid)
        assert record.evaluations == 9 and record.tuner == "grid" and not record.timing_valid
        study = next(c for n, c in studies.items() if json.loads(n.split("|")[1]) == json.loads(record.spec))
        assert tuple(sorted(record.config.items())) in study

    # the host of a runs the same command again: every bucket is found done, its DB gets the same records
    again = subprocess.run(tune_cmd(tmp_path / "a.db", *shared), env=host_env(tmp_path, "a.db"),
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "2 found done: cached" in again.stdout, again.stdout + again.stderr
    assert records(tmp_path / "a.db") == shared_records
    assert measurements(storage) == studies                     # nothing measured again
    assert "interpreter attn_fwd: 2 buckets: 2 done, 0 running, 0 left" in status_line(postgres)


def test_a_server_storage_other_than_postgresql_is_one_line(tmp_path, capsys):
    args = ["--interpret", "--quiet", "--db", str(tmp_path / "t.db"), "--kernels", "attn_fwd", "--buckets", "32x32x2"]
    assert tune.main([*args, "--storage", "mysql://tuner:secret@127.0.0.1/studies"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "PostgreSQL" in err and "secret" not in err, err


def test_an_unreachable_server_is_one_line_naming_it_without_its_password(tmp_path, capsys):
    url = f"postgresql://tuner:secret@127.0.0.1:{_free_port()}/studies"       # nothing listens there
    args = ["--interpret", "--quiet", "--db", str(tmp_path / "t.db"), "--kernels", "attn_fwd", "--buckets", "32x32x2"]
    assert tune.main([*args, "--storage", url]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "tuner:***@127.0.0.1" in err and "secret" not in err, err
    assert tune.main(["status", "--storage", url]) == 2
    assert "tuner:***@127.0.0.1" in capsys.readouterr().err
