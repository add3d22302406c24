"""summary.json: a run's summary (analysis.summary.run_summary), cached beside its meta.json.

The Runs page lists, and the Compare table lines up, many runs at once; loading
each run's ten million events to draw one row costs seconds per run. write_summary()
keeps the summary in `summary.json` next to meta.json and read_summary() hands it
back. The file is only a cache: read_summary() answers None when it is missing,
unreadable, of another summary version, of a run that was still capturing, older
than meta.json, or of another meta.json than the one there now (it keeps meta.json's
SHA-256: meta.json is rewritten last when a run finishes, and whenever its labels
change), or of tables that changed since or no longer end as Parquet files do (a summary
is trusted only while the trace it was made from is there to read), and the caller
recomputes; load_summary() does all of that.
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
_PARQUET_MAGIC = b"PAR1"  # the last four bytes of every complete Parquet file


def table_stamps(run_dir: Path) -> dict[str, list[int]]:
    """name -> [size, mtime_ns] of the run's Parquet tables, as they are now."""
    stamps = {}
    for path in sorted(Path(run_dir).glob("*.parquet")):
        try:
            st = path.stat()
        except OSError:
            continue
        stamps[path.name] = [st.st_size, st.st_mtime_ns]
    return stamps


def _tables_intact(run_dir: Path, stamps) -> bool:
    """The tables are those the summary was made from, and each still ends as a Parquet file does:
    a table truncated, overwritten or removed since makes the summary a claim about nothing."""
    if not isinstance(stamps, dict) or table_stamps(run_dir) != stamps:
        return False
    for name in stamps:
        try:
            with open(Path(run_dir) / name, "rb") as f:
                f.seek(-len(_PARQUET_MAGIC), 2)
                if f.read() != _PARQUET_MAGIC:
                    return False
        except OSError:
            return False
    return True


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


def write_summary(
    run_dir, summary: dict, meta_digest: str | None = None, tables: dict[str, list[int]] | None = None
) -> Path:
    """Store `summary` as run_dir/summary.json, atomically (profiler.trace.files).

    meta_digest: the fingerprint of meta.json as it was when the trace was read (default:
    as it is now). It is kept in the file, so that a meta.json rewritten while the summary
    was being computed leaves the cache stale rather than wrongly fresh. tables: table_stamps
    as they were when the trace was read (default: as they are now), kept for the same reason.
    """
    run_dir = Path(run_dir)
    digest = meta_digest if meta_digest is not None else _meta_digest(run_dir)
    tables = tables if tables is not None else table_stamps(run_dir)
    data = json.dumps({**summary, "meta_sha256": digest, "trace_tables": tables}, indent=1, allow_nan=False)
    atomic_write(run_dir / SUMMARY_FILE, data)
    return run_dir / SUMMARY_FILE


def read_summary(run_dir) -> dict | None:
    """The cached summary, or None if it must be recomputed: summary.json missing, corrupt, of
    another SUMMARY_VERSION or of a running capture, meta.json newer than it or changed since, or
    a table changed, gone or no longer a whole Parquet file."""
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
        or not _tables_intact(run_dir, summary.get("trace_tables"))
    ):
        return None
    summary.pop("meta_sha256")
    summary.pop("trace_tables")
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
    tables = table_stamps(run_dir)
    if load is None:
        from profiler.trace.reader import load_trace

        def load(path):
            return load_trace(path, tables=SUMMARY_TABLES)

    summary = run_summary(load(run_dir))
    if summary["status"] != "running" and digest is not None:
        try:
            write_summary(run_dir, summary, meta_digest=digest, tables=tables)
        except (OSError, ValueError):  # read-only directory; a NaN in meta's config
            pass  # a cache we cannot write is a cache we do without
    return summary


def load_summaries(run_dirs, load=None) -> list[dict]:
    """load_summary for each run directory, in order."""
    return [load_summary(d, load) for d in run_dirs]
