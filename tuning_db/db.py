"""The tuning database: one SQLite file (WAL), one row per (GPU, template, template hash, spec, bucket).

Schema (version 1)
    meta(key TEXT PRIMARY KEY, value TEXT)
        format = "flashcore-tuning-db", schema_version = "1", created_at, created_by
    records(
        gpu, template, template_hash, spec, bucket        -- primary key (spec: KernelSpec.key(), canonical JSON
                                                           -- of template + features; bucket: JSON list of ints)
        config, default_config                             -- JSON objects of ints
        latency_ms, default_ms, metric, metric_unit        -- median latency of the tuned and the heuristic default
                                                           -- config on the bucket's shape; metric in TFLOP/s or GB/s
        trials, evaluations, tuner, timing_valid, wall_s   -- Optuna trials asked, configs actually measured,
                                                           -- "optuna" | "grid" | "import", 0 under the interpreter
        flashcore_version, triton_version, torch_version, cuda_version, gpu_full_name, source_hash, created_at)

The template hash (the spec's version: a hash of the code its op renders for it, Op.version_of) is part of the
key: after an edit that changes a spec's code, lookups (which only use the spec's current version) never see its
old rows; `prune_stale` deletes them. Writers use WAL with a busy timeout and short transactions,
and retry what the busy timeout does not wait for, so several tuner processes can create and write one file.
Readers (runtime dispatch) open the file read-only, read the rows they need once, and close it.
"""
from __future__ import annotations

import json
import math
import os
import sqlite3
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterable

FORMAT = "flashcore-tuning-db"
SCHEMA_VERSION = 1
PK = ("gpu", "template", "template_hash", "spec", "bucket")


class TuningDBError(Exception):
    """A DB file that cannot be used: corrupt, foreign, from a newer schema, or locked."""


class TuningWarning(UserWarning):
    """A tuning DB or bundle was unusable; dispatch fell back (never raised into a model)."""


def user_cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "flashcore"


def user_db_path() -> Path | None:
    """$FLASHCORE_TUNING_DB, else <user cache>/flashcore/tuning.db. None when set to '', 'off' or 'none'."""
    value = os.environ.get("FLASHCORE_TUNING_DB")
    if value is not None:
        if value.strip().lower() in ("", "off", "none", "0"):
            return None
        return Path(value).expanduser()
    return user_cache_root() / "tuning.db"


def canonical_json(obj: Any) -> str:
    """Key-sorted, compact JSON: equal objects give equal text (keys, checksums)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def _ordered(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))


def bucket_text(bucket) -> str:
    return canonical_json([int(x) for x in bucket])


@dataclass
class Record:
    gpu: str
    template: str
    template_hash: str
    spec: str                               # KernelSpec.key()
    bucket: tuple[int, ...]
    config: dict[str, int]
    latency_ms: float
    metric: float = 0.0
    metric_unit: str = "TFLOP/s"
    default_config: dict[str, int] = field(default_factory=dict)
    default_ms: float = 0.0
    trials: int = 0
    evaluations: int = 0
    tuner: str = "optuna"
    timing_valid: bool = True
    wall_s: float = 0.0
    flashcore_version: str = ""
    triton_version: str = ""
    torch_version: str = ""
    cuda_version: str = ""
    gpu_full_name: str = ""
    source_hash: str = ""
    created_at: str = ""

    @property
    def key(self) -> tuple:
        return (self.gpu, self.template, self.template_hash, self.spec, tuple(self.bucket))

    def problem(self) -> str | None:
        """Why this record cannot be used, or None: the checks that hold for every op (the op's own tunables and
        feasibility are checked where the op is known: `flashcore-tune import` and dispatch)."""
        for name in ("latency_ms", "default_ms"):
            value = getattr(self, name)
            if (not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value)
                    or value < 0 or name == "latency_ms" and value == 0):
                return f"{name} must be a {'positive' if name == 'latency_ms' else 'non-negative'} finite number, got {value!r}"
        for name in ("config", "default_config"):
            config = getattr(self, name)
            if not isinstance(config, dict) or not all(isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool)
                                                       for k, v in config.items()):
                return f"{name} must map tunable names to ints, got {config!r}"
        if not self.config:
            return "config is empty"
        if not self.bucket or not all(isinstance(x, int) and x > 0 for x in self.bucket):
            return f"bucket must be positive ints, got {list(self.bucket)}"
        return None

    @property
    def speedup(self) -> float:
        return self.default_ms / self.latency_ms if self.latency_ms > 0 and self.default_ms > 0 else 1.0

    def to_row(self) -> dict[str, Any]:
        row = asdict(self)
        row["bucket"] = bucket_text(self.bucket)
        row["config"] = _ordered(self.config)          # the template's order (BLOCK_M, BLOCK_N, ...), kept
        row["default_config"] = _ordered(self.default_config)
        row["timing_valid"] = int(bool(self.timing_valid))
        return row

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> "Record":
        names = {f.name for f in fields(cls)}
        data = {k: v for k, v in row.items() if k in names}
        data["bucket"] = tuple(int(x) for x in json.loads(data["bucket"]))
        data["config"] = json.loads(data["config"])
        data["default_config"] = json.loads(data.get("default_config") or "{}")
        data["timing_valid"] = bool(data.get("timing_valid", 1))
        return cls(**data)

    def to_json(self) -> dict[str, Any]:
        """The bundle form: spec as an object, provenance grouped (reviewable)."""
        row = asdict(self)
        out = {"gpu": self.gpu, "template": self.template, "spec": json.loads(self.spec),
               "bucket": [int(x) for x in self.bucket]}
        out.update({k: row[k] for k in ("config", "latency_ms", "metric", "metric_unit", "default_config",
                                        "default_ms", "trials", "evaluations", "tuner", "timing_valid", "wall_s",
                                        "template_hash")})
        out["provenance"] = {k: row[k] for k in ("flashcore_version", "triton_version", "torch_version",
                                                 "cuda_version", "gpu_full_name", "source_hash", "created_at")}
        return out

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "Record":
        data = {k: v for k, v in obj.items() if k not in ("spec", "bucket", "provenance")}
        data.update(obj.get("provenance") or {})
        spec = obj["spec"]
        data["spec"] = canonical_json(spec) if isinstance(spec, dict) else str(spec)
        data["bucket"] = tuple(int(x) for x in obj["bucket"])
        names = {f.name for f in fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown record fields {sorted(unknown)}")
        return cls(**data)


def provenance(gpu_full_name: str = "") -> dict[str, str]:
    """Versions and time, for a record made now in this process."""
    import torch
    import triton
    from flashcore import __version__
    return {"flashcore_version": __version__, "triton_version": triton.__version__,
            "torch_version": torch.__version__, "cuda_version": str(torch.version.cuda or ""),
            "gpu_full_name": gpu_full_name, "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


_COLUMNS = {
    "gpu": str, "template": str, "template_hash": str, "spec": str, "bucket": str, "config": str,
    "latency_ms": float, "metric": float, "metric_unit": str, "default_config": str, "default_ms": float,
    "trials": int, "evaluations": int, "tuner": str, "timing_valid": int, "wall_s": float,
    "flashcore_version": str, "triton_version": str, "torch_version": str, "cuda_version": str,
    "gpu_full_name": str, "source_hash": str, "created_at": str,
}


_SQL_TYPES = {str: "TEXT", float: "REAL", int: "INTEGER"}


class TuningDB:
    """Read and write a tuning DB file.

    readonly=True opens an existing file without creating or changing anything (what dispatch does);
    otherwise the file and its schema are created as needed and a write is tried (rolled back), so that a file
    that cannot be written fails here, not at the first record. Any unusable file raises TuningDBError.
    """

    def __init__(self, path: str | os.PathLike, readonly: bool = False, timeout: float = 30.0):
        import sqlite_utils   # runtime dispatch reads the DB only after its first lookup; keep imports lazy
        self.path = Path(path)
        self.readonly = readonly
        self.timeout = timeout
        if self.path.is_dir():      # SQLite would say "unable to open database file" or "disk I/O error"
            raise TuningDBError(f"{self.path}: is a directory; expected a tuning DB file (e.g. "
                                f"{self.path / 'tuning.db'})")
        try:
            if readonly:
                if not self.path.exists():
                    raise TuningDBError(f"{self.path}: no such file")
                conn = self._connect_readonly(timeout)
            else:
                try:
                    self.path.parent.mkdir(parents=True, exist_ok=True)
                except OSError as e:
                    raise TuningDBError(f"{self.path}: cannot create its folder ({e})") from e
                conn = sqlite3.connect(str(self.path), timeout=timeout, check_same_thread=False)
            conn.execute(f"PRAGMA busy_timeout = {int(timeout * 1000)}")
            self.db = sqlite_utils.Database(conn)
            if readonly:
                self._verify()
            else:
                _retry_busy(self._create_or_verify, timeout)
                _retry_busy(self._check_writable, timeout)
        except TuningDBError:
            raise
        except sqlite3.Error as e:
            raise self._error(e) from e

    def _connect_readonly(self, timeout: float) -> sqlite3.Connection:
        """mode=ro, or, where SQLite cannot create the WAL's -shm file next to the DB (a read-only mount or
        folder), immutable=1: the file as it is on disk, no locks. Immutable mode does not read a -wal file, so
        records committed but not yet checkpointed into the DB are not seen there; writers checkpoint on close."""
        uri = f"file:{self.path}?mode=ro"
        conn = None
        try:
            conn = sqlite3.connect(uri, uri=True, timeout=timeout, check_same_thread=False)
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
            return conn
        except sqlite3.OperationalError as e:
            if "unable to open" not in str(e) and "readonly" not in str(e).replace("-", ""):
                raise
            if conn is not None:
                conn.close()
        return sqlite3.connect(uri + "&immutable=1", uri=True, timeout=timeout, check_same_thread=False)

    # -- schema --------------------------------------------------------------------------------------------
    def _meta(self) -> dict[str, str]:
        if "meta" not in self.db.table_names():
            return {}
        return {row["key"]: row["value"] for row in self.db["meta"].rows}

    def _verify(self) -> None:
        tables = self.db.table_names()   # raises sqlite3.DatabaseError on a file that is not SQLite
        meta = self._meta()
        if meta.get("format") != FORMAT or "records" not in tables:
            raise TuningDBError(f"{self.path}: not a flashcore tuning DB (an SQLite file with tables {tables})")
        try:
            version = int(meta.get("schema_version", "0"))
        except ValueError:
            version = -1
        if version != SCHEMA_VERSION:
            newer = version > SCHEMA_VERSION
            raise TuningDBError(f"{self.path}: tuning DB schema version {meta.get('schema_version')!r}, this "
                                f"flashcore reads version {SCHEMA_VERSION}"
                                + ("; made by a newer flashcore" if newer else ""))

    def _create_or_verify(self) -> None:
        conn = self.db.conn
        if not self.db.table_names():
            conn.execute("PRAGMA journal_mode=WAL")
            # one IMMEDIATE transaction: a concurrent process sees no tables or all of them
            previous, conn.isolation_level = conn.isolation_level, None
            try:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    if not self.db.table_names():
                        columns = ", ".join(f"{name} {_SQL_TYPES[kind]}" for name, kind in _COLUMNS.items())
                        conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT)")
                        conn.execute(f"CREATE TABLE records ({columns}, PRIMARY KEY ({', '.join(PK)}))")
                        conn.execute("CREATE INDEX records_gpu_template ON records (gpu, template, template_hash)")
                        conn.executemany("INSERT INTO meta (key, value) VALUES (?, ?)", [
                            ("format", FORMAT), ("schema_version", str(SCHEMA_VERSION)),
                            ("created_at", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))])
                    conn.execute("COMMIT")
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
            finally:
                conn.isolation_level = previous
        self._verify()

    def _check_writable(self) -> None:
        """A write, rolled back. SQLite opens a file it cannot write (read-only file, mount or immutable flag)
        read-only without a word and fails only at the first write: for a tuner, after its first bucket's
        measurements."""
        conn = self.db.conn
        previous, conn.isolation_level = conn.isolation_level, None
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.execute("UPDATE meta SET value = value WHERE key = 'format'")
            finally:
                conn.execute("ROLLBACK")
        finally:
            conn.isolation_level = previous

    def _error(self, e: sqlite3.Error) -> TuningDBError:
        """The error to raise for `e`, saying why the file cannot be written where that is the cause."""
        why = None
        if not self.readonly and any(s in str(e) for s in ("readonly", "unable to open", "disk I/O error")):
            why = _unwritable(self.path)
        return TuningDBError(f"{self.path}: {why or _describe(e)}")

    # -- writes --------------------------------------------------------------------------------------------
    def put(self, record: Record) -> None:
        self.put_many([record])

    def put_many(self, records: Iterable[Record]) -> int:
        if self.readonly:
            raise TuningDBError(f"{self.path}: opened read-only")
        records = list(records)
        for r in records:
            if (why := r.problem()) is not None:
                raise TuningDBError(f"{self.path}: refusing to write an unusable record ({why})")
        rows = [r.to_row() for r in records]

        def upsert() -> int:
            with self.db.conn:
                self.db["records"].upsert_all(rows, pk=list(PK))
            return len(rows)
        try:
            return _retry_busy(upsert, self.timeout)
        except sqlite3.Error as e:
            raise self._error(e) from e

    def delete(self, where: str, params: Iterable[Any] = ()) -> int:
        with self.db.conn:
            cursor = self.db.conn.execute(f"DELETE FROM records WHERE {where}", list(params))
        return cursor.rowcount

    def prune_stale(self, current: Callable[[str, str], str | None]) -> int:
        """Delete the rows whose template hash is not their spec's current version: current(template, spec) ->
        that version, or None for a spec that no longer renders (all its rows are stale)."""
        removed = 0
        for row in list(self.db.query("SELECT DISTINCT template, spec FROM records")):
            # (IS NOT: with None, every row of the spec)
            removed += self.delete("template = ? AND spec = ? AND template_hash IS NOT ?",
                                   (row["template"], row["spec"], current(row["template"], row["spec"])))
        return removed

    # -- reads ---------------------------------------------------------------------------------------------
    def records(self, gpu: str | None = None, template: str | None = None, template_hash: str | None = None,
                spec: str | None = None) -> list[Record]:
        clauses, params = [], []
        for name, value in (("gpu", gpu), ("template", template), ("template_hash", template_hash),
                            ("spec", spec)):
            if value is not None:
                clauses.append(f"{name} = ?")
                params.append(value)
        sql = "SELECT * FROM records" + (" WHERE " + " AND ".join(clauses) if clauses else "")
        sql += " ORDER BY gpu, template, spec, bucket"
        try:
            return [Record.from_row(row) for row in self.db.query(sql, params)]
        except sqlite3.Error as e:
            raise TuningDBError(f"{self.path}: {_describe(e)}") from e

    def get(self, gpu: str, spec: str, template_hash: str, bucket) -> Record | None:
        rows = list(self.db.query("SELECT * FROM records WHERE gpu = ? AND spec = ? AND template_hash = ? "
                                  "AND bucket = ?", [gpu, spec, template_hash, bucket_text(bucket)]))
        return Record.from_row(rows[0]) if rows else None

    def counts(self) -> dict[tuple[str, str, str], int]:
        """(gpu, template, template_hash) -> number of records."""
        sql = "SELECT gpu, template, template_hash, COUNT(*) AS n FROM records GROUP BY gpu, template, template_hash"
        return {(r["gpu"], r["template"], r["template_hash"]): r["n"] for r in self.db.query(sql)}

    def close(self) -> None:
        try:
            self.db.conn.close()
        except Exception:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _retry_busy(fn, timeout: float):
    """fn(), again while SQLite reports the file locked, for up to `timeout` seconds. The busy timeout does not
    cover everything: switching a new file to WAL while another process creates it fails at once."""
    deadline = time.monotonic() + timeout
    delay = 0.01
    while True:
        try:
            return fn()
        except sqlite3.OperationalError as e:
            if not _locked(e) or time.monotonic() + delay > deadline:
                raise
        time.sleep(delay)
        delay = min(2 * delay, 0.5)


def _locked(e: Exception) -> bool:
    return "locked" in str(e) or "busy" in str(e)


def _unwritable(path: Path) -> str | None:
    """Why this process cannot write the DB file `path` or create the journal files (-wal, -shm) SQLite writes
    next to it; None if it can. Tries both (nothing is written), so that the OS names the cause: permissions,
    a read-only mount, the immutable flag."""
    try:
        os.close(os.open(path, os.O_RDWR))
    except FileNotFoundError:
        pass
    except OSError as e:
        return f"the file is not writable ({e.strerror})"
    try:
        tempfile.TemporaryFile(dir=path.parent).close()
    except OSError as e:
        return (f"its folder {path.parent} is not writable ({e.strerror}); SQLite creates the DB's journal files "
                "there")
    return None


def _describe(e: Exception) -> str:
    text = str(e)
    if "not a database" in text or "malformed" in text:
        return f"corrupt or not an SQLite file ({text})"
    if _locked(e):
        return f"locked by another process ({text})"
    return text
