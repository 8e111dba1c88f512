"""Which config runs for an (op, spec, shape bucket): the one place the tuning DB plugs into.

Lookup chain, resolved once per (spec, bucket) and then memoized (every later call is one dict lookup):

    1. user DB      exact bucket: $FLASHCORE_TUNING_DB, else <user cache>/flashcore/tuning.db
    2. bundle       exact bucket: tuning_db/bundles/<gpu>.json shipped in the wheel ($FLASHCORE_BUNDLE_DIR)
    3. nearest      the tuned bucket nearest in log2 space among records of the same GPU, features and
                    version, from both sources (the user DB wins a tie); its per-bucket tunables take the
                    default's values (Op.from_neighbour)
    4. default      the op's heuristic (always valid)

A bucket between tuned ones has an exact record once `flashcore-tune heldout --validate` measured it: the nearest
bucket's config where it beat the default there, else the default (tuner 'validated neighbour' / 'validated
default'). So the nearest rule (3) serves only buckets nobody measured; where a neighbour's config was measured
slower than the default, the default runs.

Only records of the detected GPU and of the spec's current version (`Op.version_of`: the hash of the code the
spec runs) are ever used, and only records whose config the op accepts (declared tunables and values, static
feasibility: `Op.check_config`); others are skipped with one warning per file; a tuned config that still fails its
first launch falls back to the default (`first_launch`). The first lookup of an op reads its records (of every
version) from each source once (one query, one JSON parse) and keeps them in memory. A missing DB or bundle is
silent; a corrupt, foreign, locked or unreadable one gives one warning (per file) and is skipped. Nothing here
raises into a model: any failure falls back to the default. Dispatch needs the op's runtime declaration only
(flashcore/ops/base.py), no tuning code.

$FLASHCORE_TUNING=off disables 1-3 (heuristic defaults only, e.g. for ablations).
"""
from __future__ import annotations

import os
import threading
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, TypeVar

from .generator import KernelSpec
from .ops.base import Config, Op

_memo: dict[tuple[KernelSpec, tuple[int, ...]], Config] = {}
_choices: dict[tuple[KernelSpec, tuple[int, ...]], "Choice"] = {}
_on_clear: list[Callable[[], None]] = []
_lock = threading.Lock()
T = TypeVar("T")


@dataclass
class Choice:
    """A resolved config and why: source is 'user DB', 'bundle', 'nearest bucket' or 'default'."""
    config: Config
    source: str
    origin: str = ""                         # file the record came from
    bucket: tuple[int, ...] | None = None    # bucket of the record used (differs from the call's when nearest)
    record: Any = None
    reason: str = ""

    def describe(self) -> str:
        if self.source == "default":
            return f"heuristic default ({self.reason})" if self.reason else "heuristic default"
        if self.source == "nearest bucket":
            return f"nearest bucket {list(self.bucket or ())} from {self.origin}"
        tuner = getattr(self.record, "tuner", "")
        # a record `flashcore-tune heldout --validate` wrote: a neighbour's config (or the default) measured here
        return f"{self.source} {self.origin}" + (f" ({tuner})" if tuner.startswith("validated") else "")


def config_for(op: Op, spec: KernelSpec, bucket: tuple[int, ...]) -> Config:
    """The config to launch `spec` with on shapes in `bucket` (memoized)."""
    config = _memo.get((spec, bucket))
    if config is None:
        config = _resolve(op, spec, bucket)
    return config


def first_launch(op: Op, spec: KernelSpec, bucket: tuple[int, ...], launch: Callable[[Config], T]) -> T:
    """launch(config_for(...)): the first launch of a call signature, with the config dispatch chose. If a tuned
    config fails there (another driver or Triton, a record that passed every check and still does not run), warn
    once and use the op's default from then on; inside CUDA-graph capture the error is raised instead (a retry
    there would leave a half-captured graph)."""
    config = config_for(op, spec, bucket)
    try:
        return launch(config)
    except Exception as e:
        default = dict(op.default_config(spec))
        if config == default or _capturing():
            raise
        warn_once(f"launch:{spec.key()}", f"flashcore: the tuned config {config} of {spec} failed "
                                          f"({type(e).__name__}: {e}); using the default config")
        with _lock:
            _memo[(spec, bucket)] = default
            _choices[(spec, bucket)] = Choice(default, "default", reason=f"tuned config failed: {e}")
        return launch(default)


def _capturing() -> bool:
    import torch
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _resolve(op: Op, spec: KernelSpec, bucket: tuple[int, ...]) -> Config:
    try:
        choice = explain(op, spec, bucket)
    except Exception as e:    # never into a model
        warn_once("dispatch", f"flashcore: tuning lookup failed ({type(e).__name__}: {e}); using the "
                               "heuristic default configs")
        choice = Choice(dict(op.default_config(spec)), "default", reason="lookup failed")
    with _lock:
        _choices[(spec, bucket)] = choice
        _memo[(spec, bucket)] = choice.config
    return choice.config


def clear() -> None:
    """Forget resolved configs, loaded records and what was built from them (after the DB or bundles changed)."""
    with _lock:
        _memo.clear()
        _choices.clear()
        _sources.clear()
        for forget in _on_clear:
            forget()


def on_clear(forget: Callable[[], None]) -> None:
    """Call `forget` whenever resolved configs are forgotten (an op's launch plans hold configs)."""
    _on_clear.append(forget)


def last_choice(spec: KernelSpec, bucket: tuple[int, ...]) -> Choice | None:
    """How the memoized config of (spec, bucket) was chosen, if it was."""
    return _choices.get((spec, bucket))


# ----------------------------------------------------------------------------------------------- sources

@dataclass
class Source:
    """Records of one op on one GPU from one file: (spec key, version) -> {bucket: record}. Records of every
    version are kept: which one is current is known per spec (rendering every spec of a file up front would cost
    the first call of an op the renders of specs the process never runs)."""
    name: str                  # 'user DB' or 'bundle'
    path: str
    records: dict[tuple[str, str], dict[tuple[int, ...], Any]] = field(default_factory=dict)
    count: int = 0


_sources: dict[tuple[str, str, str], Source | None] = {}
_warned: set[str] = set()


def warn_once(key: str, message: str) -> None:
    """One TuningWarning per key per process (a bad file, a failing record)."""
    if key in _warned:
        return
    _warned.add(key)
    from .tuning_db import TuningWarning
    warnings.warn(message, TuningWarning, stacklevel=4)


def tuning_enabled() -> bool:
    return os.environ.get("FLASHCORE_TUNING", "on").strip().lower() not in ("off", "0", "false", "no", "none")


def current_gpu() -> str:
    """The GPU name records are keyed by ('h100', ...; 'interpreter' under TRITON_INTERPRET=1)."""
    from .device import gpu_name, interpreter_mode
    if interpreter_mode():
        return gpu_name(0)
    import torch
    index = torch.cuda.current_device() if torch.cuda.is_available() else 0
    return gpu_name(index)


def _index(source: Source, records) -> Source:
    for r in records:
        source.records.setdefault((r.spec, r.template_hash), {})[tuple(r.bucket)] = r
        source.count += 1
    return source


def _user_source(gpu: str, op: str) -> Source | None:
    from .tuning_db import TuningDB, TuningDBError, user_db_path
    path = user_db_path()
    if path is None or not path.exists():
        return None
    try:
        with TuningDB(path, readonly=True, timeout=float(os.environ.get("FLASHCORE_DB_TIMEOUT", "0.5"))) as db:
            records = db.records(gpu=gpu, template=op)
    except (TuningDBError, OSError, ValueError) as e:
        warn_once(f"db:{path}", f"flashcore: ignoring the tuning DB: {e}. Using bundled or default configs.")
        return None
    return _index(Source("user DB", str(path)), records)


def _bundle_source(gpu: str, op: str) -> Source | None:
    from .tuning_db import BundleError, bundle_path, read_bundle
    path = bundle_path(gpu)
    if not path.exists():
        return None
    try:
        _, records = read_bundle(path, expect_gpu=gpu)
    except BundleError as e:
        warn_once(f"bundle:{path}", f"flashcore: ignoring the tuning bundle: {e}. Using default configs.")
        return None
    records = [r for r in records if r.template == op]
    return _index(Source("bundle", str(path)), records)


def sources(gpu: str, op: Op) -> list[Source]:
    """The user DB and bundle records of `op` on `gpu` (loaded once, then cached)."""
    out = []
    for name, loader in (("user DB", _user_source), ("bundle", _bundle_source)):
        key = (name, gpu, op.name)
        if key not in _sources:
            _sources[key] = loader(gpu, op.name)
        if _sources[key] is not None:
            out.append(_sources[key])
    return out


def explain(op: Op, spec: KernelSpec, bucket: tuple[int, ...], gpu: str | None = None) -> Choice:
    """Walk the lookup chain for (spec, bucket) without memoizing; `gpu` overrides the detected GPU."""
    fallback = dict(op.default_config(spec))
    if not tuning_enabled():
        return Choice(fallback, "default", reason="FLASHCORE_TUNING=off")
    gpu = gpu or current_gpu()
    if gpu in ("none", ""):
        return Choice(fallback, "default", reason="no GPU detected")
    key = (spec.key(), op.version_of(spec))       # this spec's current records only
    found = sources(gpu, op)
    bucket = tuple(bucket)

    def usable(source: Source, record) -> bool:
        why = op.check_config(spec, record.config)    # any bucket: a record may serve its neighbours
        if why is None:
            return True
        warn_once(f"invalid:{source.path}", f"flashcore: ignoring tuning records in {source.path} that {op.name} "
                                             f"cannot run (e.g. {record.config}: {why})")
        return False

    for source in found:
        record = source.records.get(key, {}).get(bucket)
        if record is not None and usable(source, record):
            return Choice(dict(record.config), source.name, source.path, bucket, record)
    best = None
    for rank, source in enumerate(found):
        for other, record in source.records.get(key, {}).items():
            candidate = (op.bucket_distance(bucket, other), rank, other)
            if (best is None or candidate < best[0]) and usable(source, record):
                best = (candidate, source, record)
    if best is not None:
        (_, _, other), source, record = best
        return Choice(op.from_neighbour(spec, record.config), "nearest bucket", source.path, other, record)
    reason = "no tuned record for this GPU, features and version"
    if not found:
        reason = f"no tuning DB or bundle for GPU {gpu!r}"
    return Choice(fallback, "default", reason=reason)


def forget_warnings() -> None:
    """Warn again about files already warned about (tests)."""
    _warned.clear()
