"""Allocated bytes split by category (parameter, gradient, activation, ...), over time and at the peak.

The split is exact: at every row the category columns sum to allocated_bytes.
Bytes no block accounts for (memory that pre-dates a CPU capture, events the
ring buffer dropped) and allocations without a category count as "other".
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from profiler.schema import Action, Category
from profiler.analysis.live import Lifetimes, alive_at_peak, breakdown
from profiler.analysis.timeline import (action_mask, allocated_bytes, codes_of, downsample_index,
                                        event_bytes, int_column)

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


def category_timeline(trace, max_points: int = 4000, lt=None) -> pd.DataFrame:
    """ts_us, event_index, step, allocated_bytes and one column of bytes per category.

    Rows are downsampled on allocated_bytes (each bucket's min and max survive, so the
    peak does); whole rows are kept, so the stack still sums exactly.
    """
    ev = trace.events
    allocated = lt.allocated_bytes if lt is not None else allocated_bytes(trace)
    idx = downsample_index(len(ev), max_points, [allocated])
    size = event_bytes(ev)
    delta = np.where(action_mask(ev, Action.ALLOC.value), size, 0)
    delta -= np.where(action_mask(ev, Action.FREE_COMPLETED.value), size, 0)
    codes, present = codes_of(ev["category"])
    baseline = _baseline_by_category(trace)
    names = category_names(present + list(baseline))
    # Each event's column; a null category (code -1, the last slot) counts as other.
    column_of_code = np.array([names.index(c) for c in present] + [names.index(OTHER)], dtype=np.int64)
    column = column_of_code[codes]
    out = pd.DataFrame({
        "ts_us": int_column(ev, "ts_us")[idx],
        "event_index": idx.astype(np.int64),
        "step": int_column(ev, "step", fill=-1)[idx],
        "allocated_bytes": allocated[idx],
    })
    used = set(column_of_code[np.unique(codes)].tolist()) if len(codes) else set()
    for j, name in enumerate(names):
        out[name] = baseline.get(name, 0)
        if j in used:
            # One cumulative sum at a time: a 10M x 7 matrix would cost half a gigabyte.
            out[name] += np.cumsum(np.where(column == j, delta, 0), dtype=np.int64)[idx]
        out[name] = out[name].astype(np.int64)
    return out


def category_at_peak(trace, lt: Lifetimes | None = None) -> pd.DataFrame:
    """category, total_bytes, count, share of the bytes alive at the peak; every category listed."""
    live = alive_at_peak(trace, lt)
    live = live.assign(category=live["category"].where(live["category"].notna(), OTHER))
    table = breakdown(live, "category")
    names = category_names(table["category"])
    full = pd.DataFrame({"category": names}).merge(table, on="category", how="left")
    full["total_bytes"] = full["total_bytes"].fillna(0).astype(np.int64)
    full["count"] = full["count"].fillna(0).astype(np.int64)
    full["share"] = full["share"].fillna(0.0).astype(float)
    return full.sort_values("total_bytes", ascending=False, kind="stable").reset_index(drop=True)
