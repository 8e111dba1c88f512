"""The tuning database (SQLite, WAL) and its per-GPU JSON bundles; see db.py and bundle.py.

Imported as flashcore.tuning_db. Nothing here runs on a kernel call's hot path: dispatch reads what it needs
once per process and keeps it in memory.
"""
from .bundle import (BundleError, bundle_dir, bundle_path, make_bundle, merge_bundles, merge_records,
                     parse_bundle, read_bundle, write_bundle)
from .db import (SCHEMA_VERSION, Record, TuningDB, TuningDBError, TuningWarning, provenance, user_cache_root,
                 user_db_path)

__all__ = ["SCHEMA_VERSION", "BundleError", "Record", "TuningDB", "TuningDBError", "TuningWarning",
           "bundle_dir", "bundle_path", "make_bundle", "merge_bundles", "merge_records", "parse_bundle",
           "provenance", "read_bundle", "user_cache_root", "user_db_path", "write_bundle"]
