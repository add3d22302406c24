"""One run's headline facts as a plain dict: run_summary(), a pure function of the Trace.

The Runs page lists, and the Compare table lines up, many runs at once from these
dicts; profiler.trace.summary_cache keeps each one in summary.json beside its run,
so that a run is summarised once, and is where load_summary, load_summaries,
read_summary, write_summary and SUMMARY_FILE live.
"""

from __future__ import annotations

import math

import numpy as np

from profiler.analysis.categories import category_at_peak, category_peaks
from profiler.analysis.columns import int_column
from profiler.analysis.fragmentation import fragmentation_at_peak
from profiler.analysis.live import Lifetimes, lifetimes
from profiler.analysis.timeline import peak, reserved_bytes, start_reserved_bytes

# Bump when run_summary's keys or the meaning of a number changes: older cached ones are recomputed.
# 2: steps counts completed steps only, tail_step says whether a partial one follows them.
SUMMARY_VERSION = 2
# Tables run_summary reads; a caller may load only these.
SUMMARY_TABLES = ("events", "steps", "segments")


def median_step_time_us(trace, completed: int | None = None) -> float | None:
    """Median of the differences between consecutive step-end timestamps of the completed steps
    (the first `completed` rows: a trailing partial step's row marks the end of the capture, not
    of a step); None under two steps."""
    steps = trace.steps.sort_values("step", kind="stable")
    if completed is not None:
        steps = steps.iloc[:completed]
    if len(steps) < 2:
        return None
    return float(np.median(np.diff(int_column(steps, "ts_us"))))


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


def _peak_reserved_bytes(trace) -> int | None:
    """The most bytes reserved, the state before the first event included; None on CPU."""
    reserved = reserved_bytes(trace)
    if reserved is None:
        return None
    return max([start_reserved_bytes(trace)] + ([int(reserved.max())] if len(reserved) else []))


def step_counts(trace) -> tuple[int, bool]:
    """(steps completed, whether a partial step follows them): steps as the optimizer (or the
    script's profiler.step()) counted them.

    A finished capture writes one more steps row for the events after its last boundary
    (teardown frees, an evaluation): meta.json's steps_completed tells those rows apart, so they
    are the tail, not steps the user ran. While a capture runs, or after it was killed, every
    row is a boundary and the events since the last one are the step in progress. A finished
    trace with neither rows nor that count (an imported snapshot) counts its events' steps.
    """
    rows = int_column(trace.steps, "step")
    recorded = trace.meta.get("steps_completed")
    known = isinstance(recorded, int) and not isinstance(recorded, bool) and recorded >= 0
    event_steps = int_column(trace.events, "step", -1)
    finished = trace.meta.get("status") is not None
    if finished and not known and not len(rows):
        return int((np.unique(event_steps) >= 0).sum()), False
    completed = int((rows < recorded).sum()) if finished and known else len(rows)
    tail = len(rows) > completed or bool(len(event_steps) and event_steps.max() >= completed)
    return completed, tail


def run_summary(trace, lt: Lifetimes | None = None) -> dict:
    """Everything the Runs page and the Compare table show of one run, JSON-ready.

    Labels: run_id, name, backend, device, torch_version, status, config (meta's, nested).
    Counts: steps (completed; tail_step: a partial step follows them), events, events_dropped.
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
    peak_reserved = _peak_reserved_bytes(trace)
    frag = fragmentation_at_peak(trace, lt)
    active = lt.active_bytes
    n_steps, tail_step = step_counts(trace)
    allocator_max = _int_or_none(meta.get("max_allocated_bytes"))
    step_time = median_step_time_us(trace, n_steps)
    config = meta.get("config") if isinstance(meta.get("config"), dict) else {}
    at_peak = category_at_peak(trace, lt)
    own_peaks = category_peaks(trace, lt)
    return {
        "summary_version": SUMMARY_VERSION,
        "run_id": trace.run_id,
        "name": trace.name,
        "backend": trace.backend,
        "device": meta.get("device"),
        "torch_version": meta.get("torch_version"),
        "status": trace.status,
        "config": config,
        "steps": int(n_steps),
        "tail_step": tail_step,
        "events": int(len(trace.events)),
        "events_dropped": _int_or_none(meta.get("events_dropped")) or 0,
        "peak_allocated_bytes": int(top.allocated_bytes),
        "peak_event_index": int(top.event_index),
        "peak_step": top.step,
        "peak_phase": top.phase,
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
