"""Holes inside used segments, put down to the free that left them.

A hole is free space in a segment that also holds live blocks (an inactive split). The free
that left it is that of the allocation released last, at or before the moment, whose block
started inside the hole: coalescing makes the latest free the one that completed the hole.
A hole no captured free started in has been unused since capture began (NEVER_USED): the
rest of a segment cut for a smaller block, or space freed before capture.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from profiler.analysis.columns import int_column
from profiler.analysis.live import Lifetimes
from profiler.analysis.sites import site_of
from profiler.trace.schema import BlockState

NEVER_USED = "(no captured free left it: unused since capture began)"
BEFORE_CAPTURE = "(freed before capture)"
HOLE_COLUMNS = ("module", "site", "stack_id", "holes", "bytes", "request_sizes")


def _freed_by(trace, lt: Lifetimes, k: int) -> pd.DataFrame:
    """Allocations whose block was released at or before event k: addr, end_index, alloc_index (-1: baseline)."""
    made = int(np.searchsorted(lt.alloc_index, k, side="right"))
    gone = np.flatnonzero(lt.end_index[:made] <= k)
    base = lt.baseline[lt.baseline["end_index"].to_numpy(np.int64) <= k]
    return pd.DataFrame(
        {
            "addr": np.concatenate([base["addr"].to_numpy(np.int64), lt.addr[gone]]),
            "end_index": np.concatenate([base["end_index"].to_numpy(np.int64), lt.end_index[gone]]),
            "alloc_index": np.concatenate([np.full(len(base), -1, np.int64), lt.alloc_index[gone]]),
        }
    )


def hole_sources(trace, lt: Lifetimes, k: int, layout: pd.DataFrame) -> pd.DataFrame:
    """Each split hole with the allocation whose free left it (alloc_index; -2 where none did)."""
    holes = layout[(layout["state"] == BlockState.INACTIVE.value) & ~layout["whole_free"]]
    holes = holes.sort_values("block_addr", kind="stable").reset_index(drop=True)
    start = holes["block_addr"].to_numpy(np.int64)
    end = start + holes["size_bytes"].to_numpy(np.int64)
    freed = _freed_by(trace, lt, k)
    at = np.searchsorted(start, freed["addr"].to_numpy(np.int64), side="right") - 1
    inside = (at >= 0) & (freed["addr"].to_numpy(np.int64) < end[np.maximum(at, 0)]) if len(start) else at >= 0
    freed = freed[inside].assign(hole=at[inside]).sort_values("end_index", kind="stable")
    last = freed.drop_duplicates("hole", keep="last").set_index("hole")["alloc_index"]
    holes["alloc_index"] = last.reindex(np.arange(len(holes))).fillna(-2).astype(np.int64).to_numpy()
    return holes


def _site_sizes(trace) -> pd.Series:
    """stack_id -> how many different request sizes its allocations had over the run."""
    ev = trace.events
    allocs = ev[(ev["action"] == "alloc") & ev["stack_id"].notna()]
    return allocs.groupby(allocs["stack_id"].astype(np.int64))["size_bytes"].nunique()


def hole_table(trace, holes: pd.DataFrame, labels: dict[int, str]) -> pd.DataFrame:
    """Split bytes by the module and site of the frees that left them (HOLE_COLUMNS), largest first."""
    ev = trace.events
    idx = holes["alloc_index"].to_numpy(np.int64)
    captured = idx >= 0
    take = np.maximum(idx, 0)
    module = np.where(captured, ev["module"].astype(object).to_numpy()[take] if len(ev) else None, None)
    stack = np.where(captured, int_column(ev, "stack_id", fill=-1)[take] if len(ev) else -1, -1)
    named = {-2: NEVER_USED, -1: BEFORE_CAPTURE}
    site = [named.get(i) or site_of(s if s >= 0 else None, labels) for i, s in zip(idx.tolist(), stack.tolist())]
    df = pd.DataFrame(
        {"module": module, "site": site, "stack_id": stack, "size_bytes": holes["size_bytes"].to_numpy(np.int64)}
    )
    df["module"] = pd.Series([m if isinstance(m, str) else None for m in df["module"]], dtype=object)
    sizes = _site_sizes(trace)
    df["request_sizes"] = [int(sizes.get(s, 0)) if s >= 0 else 0 for s in df["stack_id"]]
    # Stacks that differ only in library frames share a site: one row, the largest stack's id.
    df = df.sort_values("size_bytes", ascending=False, kind="stable")
    g = df.groupby(["module", "site"], dropna=False, sort=False)
    out = g.agg(
        stack_id=("stack_id", "first"),
        holes=("size_bytes", "size"),
        bytes=("size_bytes", "sum"),
        request_sizes=("request_sizes", "max"),
    ).reset_index()
    out["stack_id"] = out["stack_id"].where(out["stack_id"] >= 0, pd.NA).astype("Int64")
    out["module"] = out["module"].astype(object).where(out["module"].notna(), None)
    return out.sort_values("bytes", ascending=False, kind="stable").reset_index(drop=True)[list(HOLE_COLUMNS)]
