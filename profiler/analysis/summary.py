"""One run's headline facts as a plain dict, and their cache beside the run (summary.json).

The Runs page lists, and the Compare table lines up, many runs at once; loading
each run's ten million events to draw one row costs seconds per run. run_summary()
computes the facts once; write_summary() keeps them in `summary.json` next to
meta.json and read_summary() hands them back. The file is only a cache:
read_summary() answers None when it is missing, unreadable, of another summary
version, of a run that was still capturing, older than meta.json, or of another
meta.json than the one there now (it keeps meta.json's SHA-256: meta.json is
rewritten last when a run finishes, and whenever its labels change), and the
caller recomputes; load_summary() does all of that.

run_summary() is a pure function of the Trace; only the *_summary functions below it
touch files.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from pathlib import Path

import numpy as np

from profiler.trace import schema
from profiler.analysis.categories import category_at_peak, category_peaks
from profiler.analysis.fragmentation import fragmentation_at_peak
from profiler.analysis.live import Lifetimes, lifetimes
from profiler.analysis.timeline import int_column, peak, reserved_bytes, start_reserved_bytes

SUMMARY_FILE = "summary.json"
# Bump when run_summary's keys or the meaning of a number changes: older files are recomputed.
SUMMARY_VERSION = 1
# Tables run_summary reads; load_summary loads only these.
SUMMARY_TABLES = ("events", "steps", "segments")


def median_step_time_us(trace) -> float | None:
    """Median of the differences between consecutive step-end timestamps; None under two steps."""
    steps = trace.steps
    if len(steps) < 2:
        return None
    ts = int_column(steps.sort_values("step", kind="stable"), "ts_us")
    return float(np.median(np.diff(ts)))


def _int_or_none(value) -> int | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        if isinstance(value, float) and math.isnan(value):
            return None
        return int(value)
    except (TypeError, ValueError):
        return None


def _finite(value) -> float | None:
    """A float JSON can hold: NaN and infinities become None."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def tokens_per_second(config, step_time_us: float | None) -> float | None:
    """config["tokens_per_step"] / median step time, when both are known."""
    tokens = (config or {}).get("tokens_per_step") if isinstance(config, dict) else None
    if isinstance(tokens, bool) or not isinstance(tokens, (int, float)) or not step_time_us:
        return None
    return _finite(tokens * 1e6 / step_time_us)


def run_summary(trace, lt: Lifetimes | None = None) -> dict:
    """Everything the Runs page and the Compare table show of one run, JSON-ready.

    Labels: run_id, name, backend, device, torch_version, status, config (meta's, nested).
    Counts: steps, events, events_dropped.
    Peak (allocated bytes, frees counted when requested): peak_allocated_bytes and where
    (peak_event_index, peak_step, peak_phase), active_at_peak_bytes; peak_active_bytes
    (the maximum of active bytes, wherever it is); peak_reserved_bytes (null on CPU);
    the allocator's own maxima from meta and whether the replay matches them.
    Fragmentation at the peak: ratio, reserved - allocated, inactive split, largest free block.
    Speed: median_step_time_us, tokens_per_step and tokens_per_s (config has tokens_per_step).
    Categories: categories_at_peak_bytes (bytes of each category at the peak; they sum to
    peak_allocated_bytes) and category_peak_bytes (each category's own maximum over the run).
    """
    lt = lt or lifetimes(trace)
    top = peak(trace, lt)
    meta = trace.meta
    reserved = reserved_bytes(trace)
    if reserved is not None:  # the state before the first event counts too
        peak_reserved = max([start_reserved_bytes(trace)] + ([int(reserved.max())] if len(reserved) else []))
    else:
        peak_reserved = None
    frag = fragmentation_at_peak(trace, lt)
    active = lt.active_bytes
    n_steps = len(trace.steps) or int((np.unique(int_column(trace.events, "step", -1)) >= 0).sum())
    allocator_max = _int_or_none(meta.get("max_allocated_bytes"))
    step_time = median_step_time_us(trace)
    config = meta.get("config") if isinstance(meta.get("config"), dict) else {}
    at_peak = category_at_peak(trace, lt)
    own_peaks = category_peaks(trace, lt)
    return {
        "summary_version": SUMMARY_VERSION,
        "run_id": trace.run_id, "name": trace.name, "backend": trace.backend,
        "device": meta.get("device"), "torch_version": meta.get("torch_version"),
        "status": trace.status, "config": config,
        "steps": int(n_steps), "events": int(len(trace.events)),
        "events_dropped": _int_or_none(meta.get("events_dropped")) or 0,
        "peak_allocated_bytes": int(top.allocated_bytes),
        "peak_event_index": int(top.event_index), "peak_step": top.step, "peak_phase": top.phase,
        "active_at_peak_bytes": int(frag["active_bytes"]),
        "peak_active_bytes": int(max([frag["active_bytes"]] + ([int(active.max())] if len(active) else []))),
        "peak_reserved_bytes": peak_reserved,
        "allocator_max_allocated_bytes": allocator_max,
        "allocator_max_reserved_bytes": _int_or_none(meta.get("max_reserved_bytes")),
        "replay_matches_allocator": None if allocator_max is None else allocator_max == top.allocated_bytes,
        "fragmentation_ratio_at_peak": _finite(frag["fragmentation_ratio"]),
        "reserved_minus_allocated_at_peak_bytes": _int_or_none(frag["reserved_minus_allocated_bytes"]),
        "inactive_split_at_peak_bytes": _int_or_none(frag["inactive_split_bytes"]),
        "largest_free_block_at_peak_bytes": _int_or_none(frag["largest_free_block_bytes"]),
        "median_step_time_us": step_time,
        "tokens_per_step": _int_or_none(config.get("tokens_per_step")),
        "tokens_per_s": tokens_per_second(config, step_time),
        "categories_at_peak_bytes": {c: int(b) for c, b in zip(at_peak["category"], at_peak["total_bytes"])},
        "category_peak_bytes": {c: int(b) for c, b in zip(own_peaks["category"], own_peaks["peak_bytes"])},
    }


# -- the cache ------------------------------------------------------------------------

def _mtime_ns(path: Path) -> int | None:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return None


def _meta_digest(run_dir: Path) -> str | None:
    """A fingerprint of meta.json's bytes (None if unreadable): a summary is of one meta.json."""
    try:
        return hashlib.sha256((run_dir / schema.META_FILE).read_bytes()).hexdigest()
    except OSError:
        return None


def write_summary(run_dir, summary: dict, meta_digest: str | None = None) -> Path:
    """Store `summary` as run_dir/summary.json, atomically (a temporary file, then os.replace).

    meta_digest: the fingerprint of meta.json as it was when the trace was read (default:
    as it is now). It is kept in the file, so that a meta.json rewritten while the summary
    was being computed leaves the cache stale rather than wrongly fresh.
    """
    run_dir = Path(run_dir)
    digest = meta_digest if meta_digest is not None else _meta_digest(run_dir)
    data = json.dumps({**summary, "meta_sha256": digest}, indent=1, allow_nan=False).encode()
    fd, tmp = tempfile.mkstemp(dir=run_dir, prefix=f".{SUMMARY_FILE}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, run_dir / SUMMARY_FILE)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
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
        summary = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError):  # ValueError covers bad UTF-8 and bad JSON
        return None
    if (not isinstance(summary, dict) or summary.get("summary_version") != SUMMARY_VERSION
            or summary.get("status") in (None, "running")
            or summary.get("meta_sha256") != _meta_digest(run_dir)):
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
