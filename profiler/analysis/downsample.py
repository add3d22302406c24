"""Fewer rows for a plot, without losing a peak: per bucket of rows, the minimum and maximum of each series.

A plot of ten million events draws a few thousand points; plain striding would drop the very
peak the plot is for. Used by the timelines (timeline.memory_timeline, categories.category_timeline)
and by the dashboard on any frame.
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def downsample_index(n: int, max_points: int, arrays: list[np.ndarray]) -> np.ndarray:
    """Row positions to keep: the first and last row, and per bucket the argmin and argmax of each array.

    Buckets are equal runs of rows (the last one shorter), laid out as a (buckets, width)
    view so that one argmax per axis does the work in O(n) instead of a sort.
    """
    if n <= max_points:
        return np.arange(n)
    n_buckets = max(1, (max_points - 2) // (2 * max(1, len(arrays))))
    width = -(-n // n_buckets)  # ceil
    full = n // width  # whole buckets; the rest of the rows form one short bucket
    base = np.arange(full) * width
    keep = [np.array([0, n - 1])]
    for values in arrays:
        values = np.asarray(values)
        if values.dtype.kind == "f":
            # Nulls never win a bucket, unless a bucket holds nothing else.
            nan = np.isnan(values)
            sides = ((np.argmax, np.where(nan, -np.inf, values)), (np.argmin, np.where(nan, np.inf, values)))
        else:
            sides = ((np.argmax, values), (np.argmin, values))
        for pick, filled in sides:
            # argmax takes the first of ties, the same row timeline.peak() reports.
            keep.append(base + pick(filled[: full * width].reshape(full, width), axis=1))
            if full * width < n:
                keep.append(np.array([full * width + pick(filled[full * width :])]))
    idx = np.unique(np.concatenate(keep))
    return idx[idx < n]


def downsample(df: pd.DataFrame, max_points: int, columns: list[str] | tuple[str, ...]) -> pd.DataFrame:
    """About `max_points` rows at most, bucketed by position, keeping each bucket's min and max
    of every column in `columns`, so that no peak (and no trough) disappears from a plot."""
    arrays = []
    for c in columns:
        col = df[c]
        if col.hasnans or col.dtype.kind == "f":
            arrays.append(col.to_numpy(dtype=np.float64, na_value=np.nan))
        else:
            arrays.append(col.to_numpy(dtype=np.int64))
    idx = downsample_index(len(df), max_points, arrays)
    return df.iloc[idx].reset_index(drop=True)
