"""flashcore-tune as a process among others: killing it leaves no worker behind, its default study storage
survives a torn or interrupted write, and two tuners started on one plan share the work and agree with the DB.

These run `python -m flashcore.tools.tune` as real processes (the path a user takes), without TRITON_INTERPRET
in their environment, so that --interpret goes through the tuner's own re-execution.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

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
