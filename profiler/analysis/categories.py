"""Allocated bytes split by category (parameter, gradient, activation, ...), over time and at the peak.

Allocated as timeline.py counts it: a block leaves its category when its free is
requested, not when the free completes.

The split is exact: at every row the category columns sum to allocated_bytes.
Bytes no block accounts for (memory that pre-dates a CPU capture, events the
ring buffer dropped) and allocations without a category count as "other".
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from profiler.analysis.columns import codes_of, event_bytes, event_kinds, int_column
from profiler.analysis.downsample import downsample_index
from profiler.analysis.live import Lifetimes, alive_at_peak, breakdown
from profiler.analysis.timeline import allocated_delta
from profiler.trace.schema import Category

OTHER = Category.OTHER.value


def category_names(extra=()) -> list[str]:
    """Every built-in category, in the schema's order, then any unknown ones seen in a trace."""
    names = [c.value for c in Category]
    return names + sorted(set(extra) - set(names))


def _baseline_by_category(trace) -> dict[str, int]:
    """Bytes each category held when capture began; the unattributed rest is other."""
    out: dict[str, int] = {}
    blocks = trace.baseline_blocks()
    if len(blocks):
        cats = blocks["category"].astype(object).where(blocks["category"].notna(), OTHER)
        sizes = int_column(blocks, "block_bytes")
        for cat, size in zip(cats, sizes.tolist()):
            out[cat] = out.get(cat, 0) + size
    rest = trace.baseline_bytes - sum(out.values())
    if rest:
        out[OTHER] = out.get(OTHER, 0) + rest
    return out


def _split(trace, lt=None):
    """(allocated delta per event, category column per event, column names, baseline per column)."""
    ev = trace.events
    if lt is not None:  # one pass over the counter instead of a replay
        delta = np.diff(lt.allocated_bytes, prepend=np.int64(trace.baseline_bytes))
    else:
        delta = allocated_delta(trace, event_kinds(ev), event_bytes(ev))
    codes, present = codes_of(ev["category"])
    baseline = _baseline_by_category(trace)
    names = category_names(present + list(baseline))
    # Each event's column; a null category (code -1, the last slot) counts as other.
    column_of_code = np.array([names.index(c) for c in present] + [names.index(OTHER)], dtype=np.int64)
    base = np.array([baseline.get(name, 0) for name in names], dtype=np.int64)
    return delta, column_of_code[codes], names, base


def category_timeline(trace, max_points: int = 4000, lt=None) -> pd.DataFrame:
    """ts_us, event_index, step, allocated_bytes and one column of bytes per category.

    Allocated bytes as timeline.py counts them (a block leaves its category when its
    free is requested). Rows are downsampled on allocated_bytes (each bucket's min and
    max survive, so the peak does); whole rows are kept, so the stack still sums exactly.
    """
    ev = trace.events
    delta, column, names, base = _split(trace, lt)
    allocated = lt.allocated_bytes if lt is not None else np.cumsum(delta, dtype=np.int64) + trace.baseline_bytes
    idx = downsample_index(len(ev), max_points, [allocated]).astype(np.int64)
    width = len(names)
    # Events between two kept rows fall in one bucket: sum each bucket per column (one
    # scatter-add over the events), then a running sum over a few thousand buckets.
    slot = np.repeat(np.arange(0, len(idx) * width, width, dtype=np.int64), np.diff(idx, prepend=-1))
    slot += column[: len(slot)]
    sums = np.zeros(len(idx) * width, dtype=np.int64)
    np.add.at(sums, slot, delta[: len(slot)])
    per_column = np.cumsum(sums.reshape(len(idx), width), axis=0, dtype=np.int64) + base
    out = pd.DataFrame(
        {
            "ts_us": int_column(ev, "ts_us")[idx],
            "event_index": idx,
            "step": int_column(ev, "step", fill=-1)[idx],
            "allocated_bytes": allocated[idx],
        }
    )
    for j, name in enumerate(names):
        out[name] = per_column[:, j]
    return out


def category_peaks(trace, lt=None) -> pd.DataFrame:
    """category, peak_bytes, event_index: each category's own maximum over the run (the first
    event it is reached at; -1 when it never exceeds what it held at the start). Every
    category is listed. Categories peak at different moments, so these do not add up."""
    delta, column, names, base = _split(trace, lt)
    rows = []
    for j, name in enumerate(names):
        at = np.flatnonzero(column == j)
        running = np.cumsum(delta[at], dtype=np.int64) + base[j]
        if len(at) and running.max() > base[j]:
            i = int(np.argmax(running))
            rows.append((name, int(running[i]), int(at[i])))
        else:
            rows.append((name, int(base[j]), -1))
    out = pd.DataFrame(rows, columns=["category", "peak_bytes", "event_index"])
    out["peak_bytes"] = out["peak_bytes"].astype(np.int64)
    out["event_index"] = out["event_index"].astype(np.int64)
    return out


def category_at_peak(trace, lt: Lifetimes | None = None) -> pd.DataFrame:
    """category, total_bytes, count, share of the bytes allocated at the peak; every category listed."""
    live = alive_at_peak(trace, lt)
    live = live.assign(category=live["category"].where(live["category"].notna(), OTHER))
    table = breakdown(live, "category")
    names = category_names(table["category"])
    full = pd.DataFrame({"category": names}).merge(table, on="category", how="left")
    full["total_bytes"] = full["total_bytes"].fillna(0).astype(np.int64)
    full["count"] = full["count"].fillna(0).astype(np.int64)
    full["share"] = full["share"].fillna(0.0).astype(float)
    return full.sort_values("total_bytes", ascending=False, kind="stable").reset_index(drop=True)
