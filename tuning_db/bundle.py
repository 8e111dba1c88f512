"""Tuning bundles: reviewable JSON files of tuning records for one GPU, shipped in the wheel.

    {
     "format": "flashcore-tuning-bundle",
     "schema": 1,
     "gpu": "h100",
     "provenance": {"created_at": ..., "flashcore_version": ..., "sources": [...], "records": N, ...},
     "checksum": "sha256:<hex of the canonical JSON of records>",
     "records": [
      {one record per line: gpu, template, spec (object), bucket, config, latency_ms, default_ms, ..., provenance},
      ...
     ]
    }

tuning_db/bundles/<gpu>.json is installed as flashcore/tuning_db/bundles/<gpu>.json; dispatch reads the one of
the detected GPU. The checksum is over the canonical (key-sorted, compact) JSON of the records. It catches hand edits that were not re-exported and truncated files; records of
another GPU inside a bundle make the whole bundle foreign.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

from .db import Record, canonical_json

FORMAT = "flashcore-tuning-bundle"
SCHEMA = 1


class BundleError(Exception):
    """A bundle that cannot be used: unreadable, corrupt, foreign, wrong checksum or schema."""


def bundle_dir() -> Path:
    """$FLASHCORE_BUNDLE_DIR, else the bundles/ folder shipped next to this module."""
    value = os.environ.get("FLASHCORE_BUNDLE_DIR")
    return Path(value).expanduser() if value else Path(__file__).resolve().parent / "bundles"


def bundle_path(gpu: str) -> Path:
    return bundle_dir() / f"{gpu}.json"


def _sort_key(obj: dict[str, Any]):
    return (obj["template"], canonical_json(obj["spec"]), obj["bucket"], obj["template_hash"])


def checksum(record_objs: Sequence[dict[str, Any]]) -> str:
    return "sha256:" + hashlib.sha256(canonical_json(list(record_objs)).encode()).hexdigest()


def make_bundle(gpu: str, records: Iterable[Record], sources: Sequence[str] = ()) -> dict[str, Any]:
    objs = []
    for r in records:
        if r.gpu != gpu:
            raise BundleError(f"record for GPU {r.gpu!r} cannot go into the {gpu!r} bundle")
        objs.append(r.to_json())
    objs.sort(key=_sort_key)
    from flashcore import __version__
    prov = {"created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "flashcore_version": __version__,
            "records": len(objs), "sources": list(sources),
            "templates": sorted({o["template"] for o in objs}),
            "timing_valid": all(o["timing_valid"] for o in objs)}
    return {"format": FORMAT, "schema": SCHEMA, "gpu": gpu, "provenance": prov, "checksum": checksum(objs),
            "records": objs}


def dumps(bundle: dict[str, Any]) -> str:
    """Pretty at the top, one record per line: small diffs in review."""
    head = {k: v for k, v in bundle.items() if k != "records"}
    lines = ["{"]
    for key in ("format", "schema", "gpu", "checksum", "provenance"):
        if key in head:
            lines.append(f' {json.dumps(key)}: {json.dumps(head.pop(key), sort_keys=True)},')
    for key, value in sorted(head.items()):
        lines.append(f' {json.dumps(key)}: {json.dumps(value, sort_keys=True)},')
    records = bundle.get("records", [])
    if records:
        lines.append(' "records": [')
        lines.extend("  " + json.dumps(r) + ("," if i + 1 < len(records) else "")
                     for i, r in enumerate(records))
        lines.append(" ]")
    else:
        lines.append(' "records": []')
    lines.append("}")
    return "\n".join(lines) + "\n"


def write_bundle(bundle: dict[str, Any], path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(dumps(bundle))
    os.replace(tmp, path)
    return path


def parse_bundle(text: str, source: str = "<bundle>", expect_gpu: str | None = None) -> tuple[dict, list[Record]]:
    try:
        bundle = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{source}: corrupt bundle, not JSON ({e})") from e
    if not isinstance(bundle, dict) or bundle.get("format") != FORMAT:
        raise BundleError(f"{source}: not a flashcore tuning bundle (no \"format\": \"{FORMAT}\")")
    if bundle.get("schema") != SCHEMA:
        raise BundleError(f"{source}: bundle schema {bundle.get('schema')!r}, this flashcore reads schema {SCHEMA}"
                          + ("; made by a newer flashcore" if isinstance(bundle.get("schema"), int)
                             and bundle["schema"] > SCHEMA else ""))
    gpu = bundle.get("gpu")
    if expect_gpu is not None and gpu != expect_gpu:
        raise BundleError(f"{source}: a bundle for GPU {gpu!r}, not for this {expect_gpu!r}")
    objs = bundle.get("records")
    if not isinstance(objs, list):
        raise BundleError(f"{source}: corrupt bundle (records is not a list)")
    if bundle.get("checksum") != checksum(objs):
        raise BundleError(f"{source}: checksum mismatch (edited by hand or truncated); re-export it with "
                          "flashcore-tune export")
    records = []
    for i, obj in enumerate(objs):
        try:
            record = Record.from_json(obj)
        except (KeyError, TypeError, ValueError) as e:
            raise BundleError(f"{source}: corrupt record #{i} ({e})") from e
        if record.gpu != gpu:
            raise BundleError(f"{source}: record #{i} is for GPU {record.gpu!r} in a {gpu!r} bundle")
        if (why := record.problem()) is not None:
            raise BundleError(f"{source}: record #{i} is unusable: {why}")
        records.append(record)
    return bundle, records


def read_bundle(path: str | os.PathLike, expect_gpu: str | None = None) -> tuple[dict, list[Record]]:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise BundleError(f"{path}: cannot read bundle ({e})") from e
    return parse_bundle(text, str(path), expect_gpu)


def better(a: Record, b: Record, prefer: str = "fastest") -> Record:
    """Which of two records for the same key to keep: valid timings over interpreter ones, then the lower
    latency ('fastest') or the later one ('newest')."""
    if a.timing_valid != b.timing_valid:
        return a if a.timing_valid else b
    if prefer == "newest":
        return a if (a.created_at, -a.latency_ms) >= (b.created_at, -b.latency_ms) else b
    return a if (a.latency_ms, b.created_at) <= (b.latency_ms, a.created_at) else b


def merge_records(groups: Iterable[Iterable[Record]], prefer: str = "fastest") -> list[Record]:
    merged: dict[tuple, Record] = {}
    for records in groups:
        for r in records:
            merged[r.key] = better(merged[r.key], r, prefer) if r.key in merged else r
    return [merged[k] for k in sorted(merged, key=lambda k: (k[1], k[3], k[4], k[2]))]


def merge_bundles(paths: Sequence[str | os.PathLike], prefer: str = "fastest") -> dict[str, Any]:
    loaded = [read_bundle(p) for p in paths]
    gpus = {bundle["gpu"] for bundle, _ in loaded}
    if len(gpus) != 1:
        raise BundleError(f"cannot merge bundles of different GPUs: {sorted(gpus)}")
    records = merge_records((records for _, records in loaded), prefer)
    return make_bundle(gpus.pop(), records, sources=[str(p) for p in paths])
