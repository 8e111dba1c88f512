"""Where flashcore-tune keeps its Optuna studies, and how the tuner processes that share them agree.

Storages (`--storage`):
    sqlite:///PATH        the default, ~/.cache/flashcore/tune/<gpu>.sqlite3: the processes of one host, no setup
    postgresql://USER[:PASSWORD]@HOST[:PORT]/DB   a PostgreSQL server: processes on any number of hosts
    a journal file path, or 'memory'

Processes sharing a storage agree through three things, the same on every storage:
  - a lock, held for the moments they must agree (asking for a config and claiming it; claiming a study's final
    A/B): an flock on a file beside a file storage; on a server, a PostgreSQL advisory lock per study, held in a
    transaction (released by the server if the holder's connection goes away);
  - claims: a RUNNING trial whose `owner` user attribute names the process measuring its config, or, with the
    `final` attribute and no config, the process running the study's final A/B;
  - liveness of a claim's owner: a process of this machine (same host, boot and pid namespace) is looked up in
    /proc, at once; a process of another machine (server storage) by its heartbeat: every few seconds it records
    one for each trial it holds (Optuna's trial heartbeats, dated by the server's clock), and a claim silent for
    longer than the grace period is stale. A stale or dead claim is marked freed and failed, and its config
    enqueued again, so the next process that asks measures it.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import re
import socket
import threading
import time
import warnings
from typing import Any

# trial user attributes (see the module doc); FREED marks a claim failed because its owner was gone (whatever
# the owner had written of a measurement before it died is void) and RETRY_OF the trial that enqueued it again
OWNER, FINAL, FREED, RETRY_OF = "owner", "final", "freed_by", "retry_of"
GRACE_S = 60              # another machine's claim without a heartbeat for this long is stale (--grace)
SQLITE_TIMEOUT_S = 60     # tuner processes sharing an SQLite storage wait this long for each other's writes
SERVER_LOCK_IDLE_MS = 120_000   # a lock holder gone silent inside its transaction (host down) loses it after this


class StorageError(Exception):
    """The study storage cannot be used (corrupt, unreadable, incompatible); the message names it."""


# ------------------------------------------------------------------------------------------- processes

def _process_start(pid: int) -> str | None:
    """What tells process `pid` apart from a later one with the same pid; None if there is no such process."""
    if os.path.isdir("/proc"):
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
        except OSError:
            return None
        return stat[stat.rindex(")") + 2:].split()[19]          # field 22: start time
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return "alive"


@functools.cache
def machine() -> str:
    """The processes this one can look up by pid: its host, that host's boot and its pid namespace (containers on
    one host, or hosts that share a name, are different machines here)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()[:8]
    except OSError:
        boot = ""
    try:
        pid_ns = os.readlink("/proc/self/ns/pid").strip("pid:[]")
    except OSError:
        pid_ns = ""
    return f"{socket.gethostname()}/{boot}/{pid_ns}"


def this_process() -> str:
    """This process as a claim's owner: machine|pid|start."""
    return f"{machine()}|{os.getpid()}|{_process_start(os.getpid())}"


def alive_here(owner: str) -> bool | None:
    """Whether the tuner process `owner` still runs; None for another machine's (it cannot be looked up here)."""
    where, pid, start = owner.rsplit("|", 2)
    if where != machine():
        return None
    return _process_start(int(pid)) == start


def owner_label(owner: str) -> str:
    """host:pid, for people."""
    where, pid, _ = owner.rsplit("|", 2)
    return f"{where.split('/')[0]}:{pid}"


# ------------------------------------------------------------------------------------------ coordination

@contextlib.contextmanager
def storage_lock(path: str):
    """An exclusive lock (flock on `path`) shared by the tuner processes of this host that use one storage."""
    import fcntl
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)                                # releases the lock


class LocalCoordination:
    """The tuner processes of one host sharing a file storage (or one process: lock_path None)."""
    heartbeats = False

    def __init__(self, lock_path: str | None = None):
        self.lock_path = lock_path

    def exclusive(self, key: str):
        """Held while processes must agree about study `key` (one lock for the whole file)."""
        return storage_lock(self.lock_path) if self.lock_path else contextlib.nullcontext()

    def hold(self, storage, trial_id: int) -> None:
        """Keep trial `trial_id` claimed (nothing to do: claims of this host are checked in /proc)."""

    def release(self, trial_id: int) -> None:
        pass


class ServerCoordination(LocalCoordination):
    """Tuner processes on any number of hosts sharing a PostgreSQL server: advisory locks and trial heartbeats."""
    heartbeats = True

    def __init__(self, url: str, grace_s: int):
        import sqlalchemy
        super().__init__(None)
        self.grace_s = grace_s
        self.heartbeat_s = max(1, min(15, grace_s // 4))         # several beats within the grace period
        self._engine = sqlalchemy.create_engine(
            url, pool_size=1, max_overflow=4, pool_pre_ping=True,
            connect_args={"options": f"-c idle_in_transaction_session_timeout={SERVER_LOCK_IDLE_MS}"})
        self._held: set[int] = set()
        self._held_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._storage = None

    @contextlib.contextmanager
    def exclusive(self, key: str):
        from sqlalchemy import text
        with self._engine.connect() as conn, conn.begin():
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": lock_key(key)})
            yield

    def stale_trial_numbers(self, storage, study_id: int) -> set[int]:
        """RUNNING trials of the study whose last heartbeat is older than the grace period (server time)."""
        return {storage.get_trial_number_from_id(i) for i in storage._get_stale_trial_ids(study_id)}

    def hold(self, storage, trial_id: int) -> None:
        """Record a heartbeat for the trial now (before its claim is visible: a claim always has one) and then
        every heartbeat_s seconds from a background thread, until release()."""
        storage.record_heartbeat(trial_id)
        with self._held_lock:
            self._storage = storage
            self._held.add(trial_id)
            if self._thread is None:
                self._thread = threading.Thread(target=self._beat, name="flashcore-tune heartbeat", daemon=True)
                self._thread.start()

    def release(self, trial_id: int) -> None:
        with self._held_lock:
            self._held.discard(trial_id)

    def _beat(self) -> None:
        while True:
            time.sleep(self.heartbeat_s)
            with self._held_lock:
                held, storage = list(self._held), self._storage
            for trial_id in held:
                try:
                    storage.record_heartbeat(trial_id)
                except Exception:
                    # the server is unreachable for now: the next beat tries again; if that lasts past the grace
                    # period, other hosts take the claims over and this process's results for them are dropped
                    pass


def lock_key(key: str) -> int:
    """A PostgreSQL advisory lock key (signed 64-bit) for a name."""
    return int.from_bytes(hashlib.sha256(f"flashcore-tune|{key}".encode()).digest()[:8], "big", signed=True)


def coordination(storage) -> LocalCoordination:
    return getattr(storage, "flashcore_coordination", None) or LocalCoordination()


# --------------------------------------------------------------------------------------------- storages

def storage_kind(url: str | None) -> str:
    """'memory', 'sqlite', 'postgresql' or 'journal'. Raises StorageError for another server (mysql://...)."""
    if url in (None, "", "memory", ":memory:"):
        return "memory"
    if url.startswith("journal://") or "://" not in url:
        return "journal"
    scheme = url.split("://", 1)[0].lower()
    if scheme.startswith("sqlite"):
        return "sqlite"
    if scheme.split("+")[0] in ("postgresql", "postgres"):
        return "postgresql"
    raise StorageError(f"study storage {redact(url)}: a server storage must be PostgreSQL (postgresql://...: tuners on "
                       "several hosts agree through its advisory locks); one host: sqlite:///PATH or a journal file")


def redact(url: str) -> str:
    """The URL without its password, for messages."""
    return re.sub(r"//([^:/@]*):[^@/]*@", r"//\1:***@", url)


def postgres_url(url: str) -> str:
    """SQLAlchemy's URL for `url`: psycopg (version 3, the `tune` extra's driver) unless a driver is named."""
    scheme, rest = url.split("://", 1)
    return f"postgresql+psycopg://{rest}" if "+" not in scheme else url


def sqlite_path(url: str) -> str:
    """The file of a 'sqlite:///PATH[?options]' storage ('' for an in-memory one)."""
    path = url[len("sqlite:///"):].partition("?")[0] if url.startswith("sqlite:///") else ""
    return "" if path == ":memory:" else path


def make_storage(url: str | None, grace_s: int = GRACE_S):
    """None / 'memory': in memory (None). 'sqlite:///PATH' (the CLI's default), 'postgresql://..': Optuna RDB
    storage (on a server, claims of other hosts silent for `grace_s` seconds are stale). Anything else: a journal
    file. Raises StorageError, naming the storage (never its password), when it cannot be opened.

    The storage's `flashcore_coordination` attribute is how processes sharing it agree (`coordination()`)."""
    from optuna.storages import JournalStorage, RDBStorage   # imports Optuna: fails early (any storage) without it
    kind = storage_kind(url)
    if kind == "memory":
        return None
    if kind == "postgresql":
        return _server_storage(url, grace_s)
    if kind == "sqlite":
        path = sqlite_path(url)
    else:
        path = url[len("journal://"):] if url.startswith("journal://") else url
    where = path or url
    if path:
        path = os.path.abspath(os.path.expanduser(path))
        os.makedirs(os.path.dirname(path), exist_ok=True)
    coord = LocalCoordination(path + ".tuner.lock" if path else None)
    try:
        with coord.exclusive("tables"):                 # concurrent first opens would race to create the same tables
            if kind == "journal":
                from optuna.storages.journal import JournalFileBackend
                storage = JournalStorage(JournalFileBackend(path))
            elif path:
                import sqlite3
                # WAL: workers read the studies while another one writes; the timeout makes them wait for each
                # other's writes instead of failing with "database is locked"
                with contextlib.closing(sqlite3.connect(path, timeout=SQLITE_TIMEOUT_S)) as conn:
                    conn.execute("PRAGMA journal_mode=WAL")
                storage = RDBStorage(url, engine_kwargs={"connect_args": {"timeout": SQLITE_TIMEOUT_S}})
            else:
                storage = RDBStorage(url)
    except Exception as e:
        raise StorageError(f"study storage {where} is unusable ({type(e).__name__}: {brief(e)}): delete it to start "
                           "the studies over (the tuning DB keeps its records), or pass another --storage") from e
    storage.flashcore_coordination = coord
    return storage


def _server_storage(url: str, grace_s: int):
    from optuna.exceptions import ExperimentalWarning
    from optuna.storages import RDBStorage
    if grace_s < 4:
        raise StorageError(f"--grace {grace_s}: expected at least 4 seconds (heartbeats are recorded every "
                           "grace/4 seconds)")
    where = redact(url)
    url = postgres_url(url)
    try:
        coord = ServerCoordination(url, grace_s)
        with coord.exclusive("tables"), warnings.catch_warnings():
            # concurrent first opens, from any host, would race to create the same tables
            warnings.simplefilter("ignore", ExperimentalWarning)       # heartbeat_interval
            storage = RDBStorage(url, heartbeat_interval=coord.heartbeat_s, grace_period=grace_s,
                                 engine_kwargs={"pool_pre_ping": True})
    except ImportError as e:
        raise StorageError(f"study storage {where} needs the PostgreSQL driver psycopg: pip install "
                           f"'flashcore[tune]' ({brief(e)})") from e
    except Exception as e:
        raise StorageError(f"study storage {where} is unusable ({type(e).__name__}: {brief(e)}): check the URL and "
                           "the server, or pass another --storage") from e
    storage.flashcore_coordination = coord
    return storage


def brief(e: Exception, n: int = 300) -> str:
    """The error's message on one line, cut at n characters."""
    text = " ".join(str(e).split())
    return text[:n] + ("..." if len(text) > n else "")


# ----------------------------------------------------------------------------------------- claims view

def running_claims(storage, study_id: int, trials, me: str) -> tuple[list[Any], list[Any]]:
    """(live, gone): the RUNNING trials of the study that another process claimed (see the module doc), split
    by whether their owner still runs. Claims of another machine on a storage without heartbeats are in neither:
    they cannot be checked, so they are not honoured."""
    from optuna.trial import TrialState
    coord = coordination(storage)
    live, gone = [], []
    stale: set[int] | None = None
    for t in trials:
        owner = t.user_attrs.get(OWNER)
        if t.state != TrialState.RUNNING or not owner or owner == me:
            continue
        alive = alive_here(owner)
        if alive is None and coord.heartbeats:
            if stale is None:
                stale = coord.stale_trial_numbers(storage, study_id)
            alive = t.number not in stale
        if alive:
            live.append(t)
        elif alive is False:
            gone.append(t)
    return live, gone
