"""flashcore-tune as a process among others: killing it leaves no worker behind, its default study storage
survives a torn or interrupted write, and two tuners started on one plan share the work and agree with the DB.

These run `python -m flashcore.tools.tune` as real processes (the path a user takes), without TRITON_INTERPRET
in their environment, so that --interpret goes through the tuner's own re-execution.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from flashcore import ops
from flashcore.tools import tune
from flashcore.tools.tune_storage import make_storage
from flashcore.tuning_db import TuningDB

pytestmark = [pytest.mark.usefixtures("cpu_only"), pytest.mark.skipif(sys.platform != "linux",
                                                                      reason="reads /proc")]

PLAN = ["--kernels", "attn_fwd", "--buckets", "64x64x4"]      # 2 buckets (causal or not), 9 feasible configs each


def tune_env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["XDG_CACHE_HOME"] = str(tmp / "cache")          # the default study storage lives under the user cache
    env["FLASHCORE_BUNDLE_DIR"] = str(tmp / "no-bundles")
    return env


def tune_cmd(db: Path, *extra: str, library: bool = False) -> list[str]:
    """flashcore-tune as a program, or (library=True) called as tune.main(argv) by another Python program."""
    entry = (["-c", "import sys; from flashcore.tools import tune; sys.exit(tune.main(sys.argv[1:]))"] if library
             else ["-m", "flashcore.tools.tune"])
    return [sys.executable, *entry, "--interpret", "--quiet", "--db", str(db), *extra]


# ------------------------------------------------------------------------------------------ processes

def _processes() -> dict[int, tuple[int, str, str]]:
    """pid -> (session id, state, command line) of every process we can read."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()          # after "pid (comm) ": state ppid pgrp session ...
        out[int(entry)] = (int(fields[3]), fields[0], cmdline)
    return out


def _left_behind(session: int, marker: str) -> list[str]:
    """Live (not zombie) processes of the tuner's session, or naming its unique DB path."""
    return [f"{pid}: {cmd}" for pid, (sid, state, cmd) in _processes().items()
            if state != "Z" and (sid == session or marker in cmd)]


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@pytest.mark.parametrize("library,devices,sig", [
    (False, None, signal.SIGKILL), (False, None, signal.SIGTERM), (True, None, signal.SIGKILL),
    (False, "2", signal.SIGKILL), (False, "2", signal.SIGTERM), (False, "2", signal.SIGINT)],
    ids=["kill", "term", "library-kill", "workers-kill", "workers-term", "workers-int"])
def test_killing_the_tuner_leaves_no_process_behind(tmp_path, library, devices, sig):
    db = tmp_path / "killed-tuner.db"                       # unique: marks the tuner's processes
    cmd = tune_cmd(db, *PLAN, "--trials", "9", *(["--devices", devices] if devices else []), library=library)
    proc = subprocess.Popen(cmd, env=tune_env(tmp_path), start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        header = proc.stdout.readline()                     # printed once the tuning process is set up
        assert header.startswith("flashcore-tune:"), header + proc.stdout.read()
        if devices:                                          # the workers are up and measuring
            _wait_for(lambda: sum("spawn_main" in line for sid, _, line in _processes().values()
                                  if sid == proc.pid) == 2, 60, "two worker processes")
        _wait_for(db.exists, 60, "the tuning DB")          # created when the first bucket starts
        time.sleep(1.0)                                      # measuring by now
        proc.send_signal(sig)
        proc.wait(timeout=30)
        deadline = time.time() + 10
        while _left_behind(proc.pid, str(db)) and time.time() < deadline:
            time.sleep(0.1)
    finally:
        left = _left_behind(proc.pid, str(db))
        for line in left:                                   # do not leak them into the rest of the session
            os.kill(int(line.split(":")[0]), signal.SIGKILL)
    assert not left, f"still running 10 s after {signal.Signals(sig).name} to the tuner: {left}"


# ------------------------------------------------------------------------------------------ storage

def default_storage(tmp: Path) -> Path:
    return tmp / "cache" / "flashcore" / "tune" / "interpreter.sqlite3"


def run_cli(tmp: Path, db: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(tune_cmd(db, *extra), env=tune_env(tmp), capture_output=True, text=True, timeout=600)


def measured(storage) -> list[Counter]:
    """Per study: how many times each config was measured (trials marked evaluated, finished)."""
    import optuna
    out = []
    for summary in optuna.get_all_study_summaries(storage):
        study = optuna.load_study(study_name=summary.study_name, storage=storage)
        out.append(Counter(tuple(sorted(t.params.items())) for t in study.trials
                           if t.user_attrs.get("evaluated") and t.state.is_finished()))
    return out


KILLED_WRITER = """
import os, signal, sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("PRAGMA cache_size = 1")                     # spill the transaction's pages into the WAL early
conn.execute("BEGIN IMMEDIATE")
conn.execute("UPDATE trials SET state = 'FAIL'")
conn.execute("CREATE TABLE scratch (x)")
conn.executemany("INSERT INTO scratch VALUES (?)", [(os.urandom(512),) for _ in range(4000)])
os.kill(os.getpid(), signal.SIGKILL)                      # dies in the middle of its write
"""


def test_default_storage_survives_torn_and_interrupted_writes(tmp_path):
    # what the journal default left behind: a torn record followed by later ones (every run failed on it)
    journal = tmp_path / "cache" / "flashcore" / "tune" / "interpreter.journal"
    journal.parent.mkdir(parents=True)
    journal.write_text('{"op_code":0,"worker_id":"a","study_name":"s","directions":[1]}\n{"op_code":4,"work'
                       '{"op_code":0,"worker_id":"b","study_name":"t","directions":[1]}\n')
    db = tmp_path / "tuning.db"
    first = run_cli(tmp_path, db, *PLAN, "--feature", "causal=false", "--trials", "2")
    assert first.returncode == 0, first.stdout + first.stderr
    storage = default_storage(tmp_path)
    assert [sum(c.values()) for c in measured(make_storage(f"sqlite:///{storage}"))] == [2]

    killed = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(storage)], capture_output=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    second = run_cli(tmp_path, db, *PLAN, "--feature", "causal=false", "--trials", "4")
    assert second.returncode == 0, second.stdout + second.stderr
    (counts,) = measured(make_storage(f"sqlite:///{storage}"))
    assert sum(counts.values()) == 4 and set(counts.values()) == {1}     # resumed: 2 kept, 2 new, none again
    with TuningDB(db, readonly=True) as tdb:
        assert [r.evaluations for r in tdb.records()] == [4]


def _tear(journal: Path) -> None:
    """A record cut short by a killed writer, then the records other writers appended after it."""
    lines = journal.read_bytes().splitlines(keepends=True)
    journal.write_bytes(b"".join(lines[:-2]) + lines[-2][:len(lines[-2]) // 2] + lines[-2] + lines[-1])


@pytest.mark.parametrize("kind", ["journal", "journal-retune", "default"])
def test_an_unusable_storage_is_one_line_naming_it(tmp_path, monkeypatch, capsys, kind):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("FLASHCORE_BUNDLE_DIR", str(tmp_path / "no-bundles"))
    args = ["--interpret", "--quiet", "--db", str(tmp_path / "tuning.db"), *PLAN, "--feature", "causal=false",
            "--trials", "1"]
    if kind == "default":
        path = default_storage(tmp_path)
        path.parent.mkdir(parents=True)
        path.write_bytes(b"not a database, " * 1024)            # overwritten by something else
    else:
        path = tmp_path / "studies.journal"
        args += ["--storage", str(path)]
        assert tune.main(args) == 0
        _tear(path)
        args += ["--retune"] if kind == "journal-retune" else []
    capsys.readouterr()
    assert tune.main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(path) in err and "--storage" in err, err


# --------------------------------------------------------------------------------- two tuners, one plan

@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_two_tuners_on_one_plan_share_the_work_and_agree_with_the_db(tmp_path, kind):
    db = tmp_path / "tuning.db"
    url = f"sqlite:///{tmp_path / 'studies.sqlite3'}" if kind == "sqlite" else str(tmp_path / "studies.journal")
    procs = [subprocess.Popen(tune_cmd(db, *PLAN, "--trials", "6", "--storage", url, "--report",
                                       str(tmp_path / f"report{i}.json")),
                              env=tune_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert all("2/2 buckets tuned" in out for out in outs), outs

    studies = measured(make_storage(url))
    assert len(studies) == 2 and all(sum(c.values()) >= 6 for c in studies)
    assert all(set(c.values()) == {1} for c in studies), f"configs measured twice: {studies}"

    with TuningDB(db, readonly=True) as tdb:
        records = {(r.spec, r.bucket): r for r in tdb.records()}
    assert len(records) == 2
    assert sorted(r.evaluations for r in records.values()) == sorted(sum(c.values()) for c in studies)
    tuned_by = Counter()
    for i in range(2):
        report = json.loads((tmp_path / f"report{i}.json").read_text())
        rows = report["buckets"]
        assert len(rows) == 2 and report["summary"]["cached"] == sum(row["status"] == "cached" for row in rows)
        for row in rows:                        # what each process printed is what the DB holds
            record = records[(row["spec"], tuple(row["bucket"]))]
            assert (row["config"], row["ms"], row["default_ms"], row["evaluations"]) == \
                (record.config, record.latency_ms, record.default_ms, record.evaluations), (i, row, record)
            assert record.template_hash == ops.current_version(row["op"], row["spec"])
            tuned_by[(row["spec"], tuple(row["bucket"]))] += row["status"] == "tuned"
    assert set(tuned_by.values()) == {1}, tuned_by       # each bucket finalized once; the other found it done


def test_a_killed_tuners_claims_do_not_block_the_next_run(tmp_path):
    import optuna
    db = tmp_path / "tuning.db"
    url = f"sqlite:///{tmp_path / 'studies.sqlite3'}"
    args = [*PLAN, "--feature", "causal=false", "--trials", "4", "--storage", url]

    def claimed():                              # trials some process is measuring right now
        storage = make_storage(url)
        return [t for s in optuna.get_all_study_summaries(storage)
                for t in optuna.load_study(study_name=s.study_name, storage=storage).get_trials(
                    deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)) if t.user_attrs.get("owner")]

    proc = subprocess.Popen(tune_cmd(db, *args), env=tune_env(tmp_path), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for(lambda: (tmp_path / "studies.sqlite3").exists() and claimed(), 120, "a claimed trial")
    finally:
        proc.kill()                             # mid-measurement: its claim stays in the storage
        proc.wait()
    assert claimed()
    again = subprocess.run(tune_cmd(db, *args), env=tune_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    (counts,) = measured(make_storage(url))
    assert sum(counts.values()) == 4 and set(counts.values()) == {1}
    assert not claimed()                        # the dead process's claim was freed, not waited for
    with TuningDB(db, readonly=True) as tdb:
        assert [r.evaluations for r in tdb.records()] == [4]
