"""summary.json: a run's summary (analysis.summary.run_summary), cached beside its meta.json.

The Runs page lists, and the Compare table lines up, many runs at once; loading
each run's ten million events to draw one row costs seconds per run. write_summary()
keeps the summary in `summary.json` next to meta.json and read_summary() hands it
back. The file is only a cache: read_summary() answers None when it is missing,
unreadable, of another summary version, of a run that was still capturing, older
than meta.json, or of another meta.json than the one there now (it keeps meta.json's
SHA-256: meta.json is rewritten last when a run finishes, and whenever its labels
change), and the caller recomputes; load_summary() does all of that.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from profiler.analysis.summary import SUMMARY_TABLES, SUMMARY_VERSION, run_summary
from profiler.trace import schema
from profiler.trace.files import atomic_write
from profiler.trace.problems import read_small

SUMMARY_FILE = "summary.json"


def _mtime_ns(path: Path) -> int | None:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return None


def _meta_digest(run_dir: Path) -> str | None:
    """A fingerprint of meta.json's bytes (None if unreadable): a summary is of one meta.json."""
    try:
        return hashlib.sha256(read_small(Path(run_dir) / schema.META_FILE)).hexdigest()
    except OSError:
        return None


def write_summary(run_dir, summary: dict, meta_digest: str | None = None) -> Path:
    """Store `summary` as run_dir/summary.json, atomically (profiler.trace.files).

    meta_digest: the fingerprint of meta.json as it was when the trace was read (default:
    as it is now). It is kept in the file, so that a meta.json rewritten while the summary
    was being computed leaves the cache stale rather than wrongly fresh.
    """
    run_dir = Path(run_dir)
    digest = meta_digest if meta_digest is not None else _meta_digest(run_dir)
    data = json.dumps({**summary, "meta_sha256": digest}, indent=1, allow_nan=False)
    atomic_write(run_dir / SUMMARY_FILE, data)
    return run_dir / SUMMARY_FILE


def read_summary(run_dir) -> dict | None:
    """The cached summary, or None if it must be recomputed: summary.json missing, corrupt, of
    another SUMMARY_VERSION or of a running capture, meta.json newer than it or changed since."""
    run_dir = Path(run_dir)
    path = run_dir / SUMMARY_FILE
    meta_mtime = _mtime_ns(run_dir / schema.META_FILE)
    summary_mtime = _mtime_ns(path)
    if meta_mtime is None or summary_mtime is None or meta_mtime > summary_mtime:
        return None
    try:
        summary = json.loads(read_small(path))
    except (OSError, ValueError, RecursionError):  # ValueError covers bad UTF-8 and bad JSON
        return None
    if (
        not isinstance(summary, dict)
        or summary.get("summary_version") != SUMMARY_VERSION
        or summary.get("status") in (None, "running")
        or summary.get("meta_sha256") != _meta_digest(run_dir)
    ):
        return None
    summary.pop("meta_sha256")
    return summary


def load_summary(run_dir, load=None) -> dict:
    """The run's summary: from summary.json when fresh, else computed and cached.

    load: run_dir -> Trace (default: the reader, with only SUMMARY_TABLES). A run still
    capturing is summarised but not cached; neither is one whose directory is read-only.
    """
    run_dir = Path(run_dir)
    cached = read_summary(run_dir)
    if cached is not None:
        return cached
    digest = _meta_digest(run_dir)  # before reading: what the summary will be of
    if load is None:
        from profiler.trace.reader import load_trace

        def load(path):
            return load_trace(path, tables=SUMMARY_TABLES)

    summary = run_summary(load(run_dir))
    if summary["status"] != "running" and digest is not None:
        try:
            write_summary(run_dir, summary, meta_digest=digest)
        except (OSError, ValueError):  # read-only directory; a NaN in meta's config
            pass  # a cache we cannot write is a cache we do without
    return summary


def load_summaries(run_dirs, load=None) -> list[dict]:
    """load_summary for each run directory, in order."""
    return [load_summary(d, load) for d in run_dirs]
