"""Fragmentation, by replaying the allocator's address space.

The state at a moment is the start snapshot's segments changed by the segment
events so far, with the blocks alive then laid into them. Free space is what no
live block covers, so adjacent free blocks coalesce by construction, which is
what the allocator does when it frees a block next to a free one.

Segment events are few (hundreds per run), so they are replayed in a Python
loop; blocks are many, so they come from the vectorised lifetimes.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from profiler.analysis.columns import action_mask, int_column, is_cpu, runs
from profiler.analysis.live import Lifetimes, lifetimes
from profiler.analysis.timeline import baseline_active_bytes, peak
from profiler.trace.schema import Action, BlockState, SnapshotKind

_SEGMENT_ACTIONS = (
    Action.SEGMENT_ALLOC.value,
    Action.SEGMENT_FREE.value,
    Action.SEGMENT_MAP.value,
    Action.SEGMENT_UNMAP.value,
)
FRAGMENTATION_COLUMNS = (
    "point",
    "event_index",
    "ts_us",
    "step",
    "reserved_bytes",
    "allocated_bytes",
    "active_bytes",
    "reserved_minus_allocated_bytes",
    "inactive_split_bytes",
    "largest_free_block_bytes",
    "fragmentation_ratio",
)
SEGMENT_MAP_COLUMNS = ("segment_addr", "segment_bytes", "block_addr", "size_bytes", "state", "category")


class _Segments:
    """Segments as {start: [end, expandable]}, advanced event by event in stream order."""

    def __init__(self, trace):
        seg = trace.segments
        start = seg[seg["snapshot"] == SnapshotKind.START.value].drop_duplicates("segment_addr") if len(seg) else seg
        expandable = (
            start["is_expandable"].fillna(False).astype(bool).tolist()
            if "is_expandable" in start
            else [False] * len(start)
        )
        self.ranges = {
            a: [a + b, x]
            for a, b, x in zip(
                int_column(start, "segment_addr").tolist(), int_column(start, "segment_bytes").tolist(), expandable
            )
        }
        ev = trace.events
        idx = np.flatnonzero(action_mask(ev, *_SEGMENT_ACTIONS))
        self._events = list(
            zip(
                idx.tolist(),
                ev["action"].iloc[idx].astype(str).tolist(),
                int_column(ev, "addr")[idx].tolist(),
                int_column(ev, "size_bytes")[idx].tolist(),
            )
        )
        self._next = 0

    def advance_to(self, k: int) -> None:
        """Apply every segment event with index <= k (k only grows between calls)."""
        while self._next < len(self._events) and self._events[self._next][0] <= k:
            _, action, addr, size = self._events[self._next]
            self._apply(action, addr, size)
            self._next += 1

    def _apply(self, action: str, addr: int, size: int) -> None:
        if action == Action.SEGMENT_ALLOC.value:
            self.ranges[addr] = [addr + size, False]
        elif action == Action.SEGMENT_FREE.value:
            self.ranges.pop(addr, None)
        elif action == Action.SEGMENT_MAP.value:
            # An expandable segment grows by mapping pages at its end: extend, then join a neighbour.
            left = next((s for s, (e, x) in self.ranges.items() if x and e == addr), None)
            start = left if left is not None else addr
            self.ranges[start] = [addr + size, True]
            right = self.ranges.get(addr + size)
            if right is not None and right[1]:
                self.ranges[start][0] = right[0]
                del self.ranges[addr + size]
        elif action == Action.SEGMENT_UNMAP.value:
            host = next((s for s, (e, _) in self.ranges.items() if s <= addr < e), None)
            if host is None:
                return
            end, expandable = self.ranges.pop(host)
            if host < addr:
                self.ranges[host] = [addr, expandable]
            if addr + size < end:
                self.ranges[addr + size] = [end, expandable]

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        starts = np.array(sorted(self.ranges), dtype=np.int64)
        ends = np.array([self.ranges[s][0] for s in starts.tolist()], dtype=np.int64)
        return starts, ends


def _occupied(trace, lt: Lifetimes, k: int) -> pd.DataFrame:
    """Blocks that hold memory just after event k: allocated, or pending free (requested, not completed)."""
    made = int(np.searchsorted(lt.alloc_index, k, side="right"))
    alive = np.flatnonzero(lt.end_index[:made] > k)
    idx = lt.alloc_index[alive]
    cats = trace.events["category"].iloc[idx].astype(object).to_numpy() if len(idx) else []
    pending = lt.release_index[alive] <= k
    base = lt.baseline[lt.baseline["end_index"].to_numpy(np.int64) > k]
    # A block pending free at the start has release_index -1.
    base_pending = base["release_index"].to_numpy(np.int64) <= k
    return pd.DataFrame(
        {
            "addr": np.concatenate([base["addr"].to_numpy(np.int64), lt.addr[alive]]),
            "size_bytes": np.concatenate([base["size_bytes"].to_numpy(np.int64), lt.size_bytes[alive]]),
            "pending": np.concatenate([base_pending, pending]),
            "category": np.concatenate([base["category"].to_numpy(object), np.asarray(cats, dtype=object)]),
        }
    )


def _layout(starts: np.ndarray, ends: np.ndarray, blocks: pd.DataFrame) -> pd.DataFrame:
    """Occupied blocks and free gaps, segment by segment (SEGMENT_MAP_COLUMNS, unsorted)."""
    blocks = blocks.sort_values("addr", kind="stable")
    a = blocks["addr"].to_numpy(np.int64)
    e = a + blocks["size_bytes"].to_numpy(np.int64)
    sid = np.searchsorted(starts, a, side="right") - 1
    inside = (sid >= 0) & (a < ends[np.maximum(sid, 0)]) if len(starts) else np.zeros(len(a), bool)
    blocks, a, e, sid = blocks[inside], a[inside], e[inside], sid[inside]
    first = np.ones(len(a), dtype=bool)
    first[1:] = sid[1:] != sid[:-1]
    last = np.ones(len(a), dtype=bool)
    last[:-1] = sid[1:] != sid[:-1]
    prev_end = np.where(first, starts[sid], np.concatenate([[0], e[:-1]]))
    empty = np.setdiff1d(np.arange(len(starts)), sid)
    gap_seg = np.concatenate([sid, sid[last], empty])
    gap_addr = np.concatenate([prev_end, e[last], starts[empty]])
    gap_size = np.concatenate([a - prev_end, ends[sid[last]] - e[last], ends[empty] - starts[empty]])
    keep = gap_size > 0
    state = np.where(
        blocks["pending"].to_numpy(bool), BlockState.ACTIVE_PENDING_FREE.value, BlockState.ACTIVE_ALLOCATED.value
    )
    seg = np.concatenate([sid, gap_seg[keep]])
    return pd.DataFrame(
        {
            "segment_addr": starts[seg],
            "segment_bytes": (ends - starts)[seg],
            "block_addr": np.concatenate([a, gap_addr[keep]]),
            "size_bytes": np.concatenate([e - a, gap_size[keep]]),
            "state": np.concatenate([state, np.full(keep.sum(), BlockState.INACTIVE.value)]).astype(object),
            "category": np.concatenate([blocks["category"].to_numpy(object), np.full(keep.sum(), None)]),
        }
    )


def segment_map_at(trace, event_index: int, lt: Lifetimes | None = None) -> pd.DataFrame:
    """Every block of every segment just after `event_index`, free gaps as state "inactive".

    Sorted by address, for drawing the address space. Empty on the CPU backend.
    """
    if is_cpu(trace):
        return pd.DataFrame({c: [] for c in SEGMENT_MAP_COLUMNS})
    lt = lt or lifetimes(trace)
    segments = _Segments(trace)
    segments.advance_to(event_index)
    layout = _layout(*segments.arrays(), _occupied(trace, lt, event_index))
    return layout.sort_values(["segment_addr", "block_addr"], kind="stable").reset_index(drop=True)


def _stats(layout: pd.DataFrame, reserved: int, allocated: int) -> dict:
    # Free bytes in a segment that also holds live blocks can only serve requests that fit
    # between those blocks: that is torch's inactive_split. Blocks pending free are not free.
    free = layout["state"].to_numpy() == BlockState.INACTIVE.value
    used_segments = np.unique(layout["segment_addr"].to_numpy()[~free])
    split = free & np.isin(layout["segment_addr"].to_numpy(), used_segments)
    sizes = layout["size_bytes"].to_numpy(np.int64)
    return {
        "reserved_bytes": reserved,
        "reserved_minus_allocated_bytes": reserved - allocated,
        "inactive_split_bytes": int(sizes[split].sum()),
        "largest_free_block_bytes": int(sizes[free].max()) if free.any() else 0,
        "fragmentation_ratio": (reserved - allocated) / reserved if reserved else np.nan,
    }


def _points(trace, lt: Lifetimes, every_n_events: int | None) -> list[tuple[str, int]]:
    steps = int_column(trace.events, "step", fill=-1)
    # The last event of each step is the state at the step boundary.
    starts, ends = runs(steps)
    last = pd.Series(ends).groupby(steps[starts]).max()
    points = [("step_end", int(i)) for s, i in last.items() if s >= 0]
    points.append(("peak", peak(trace, lt).event_index))
    if every_n_events:
        points += [("every_n", i) for i in range(every_n_events - 1, lt.n_events, every_n_events)]
    return sorted(points, key=lambda p: (p[1], p[0]))


def _row(trace, lt: Lifetimes, segments: _Segments | None, point: str, k: int) -> dict:
    """One FRAGMENTATION_COLUMNS row for the state just after event k; segments=None on CPU."""
    ev = trace.events
    if k >= 0:
        allocated, active = int(lt.allocated_bytes[k]), int(lt.active_bytes[k])
    else:
        allocated, active = trace.baseline_bytes, baseline_active_bytes(trace)
    row = {
        "point": point,
        "event_index": k,
        "ts_us": int(ev["ts_us"].iloc[k]) if k >= 0 else None,
        "step": int(ev["step"].iloc[k]) if k >= 0 and pd.notna(ev["step"].iloc[k]) else None,
        "allocated_bytes": allocated,
        "active_bytes": active,
    }
    if segments is None:
        row.update(
            reserved_bytes=None,
            reserved_minus_allocated_bytes=None,
            inactive_split_bytes=None,
            largest_free_block_bytes=None,
            fragmentation_ratio=np.nan,
        )
        return row
    segments.advance_to(k)
    starts, ends = segments.arrays()
    layout = _layout(starts, ends, _occupied(trace, lt, k))
    row.update(_stats(layout, int((ends - starts).sum()), allocated))
    return row


def replay_at(trace, event_indices, lt: Lifetimes | None = None) -> pd.DataFrame:
    """reserved, inactive split and largest free block bytes just after each of `event_indices`
    (ascending; -1 is the start), from the replayed address space; no rows on the CPU backend."""
    columns = ("event_index", "reserved_bytes", "inactive_split_bytes", "largest_free_block_bytes")
    if is_cpu(trace):
        return pd.DataFrame({c: pd.Series([], dtype="Int64") for c in columns})
    lt = lt or lifetimes(trace)
    segments, rows = _Segments(trace), []
    for k in event_indices:
        segments.advance_to(k)
        starts, ends = segments.arrays()
        # Allocated bytes (0 here) enter only the columns this function leaves out.
        stats = _stats(_layout(starts, ends, _occupied(trace, lt, k)), int((ends - starts).sum()), 0)
        rows.append([k] + [stats[c] for c in columns[1:]])
    return pd.DataFrame(rows, columns=list(columns), dtype="Int64")


def fragmentation(trace, every_n_events: int | None = None, lt: Lifetimes | None = None) -> pd.DataFrame:
    """One row per step boundary, at the peak, and every N events if asked (FRAGMENTATION_COLUMNS).

    allocated_bytes and active_bytes as timeline.py counts them; the fragmentation ratio is
    (reserved - allocated) / reserved, and blocks pending free count as occupied, not free.

    On the CPU backend the allocator columns are null: there is no allocator to fragment.
    """
    lt = lt or lifetimes(trace)
    segments = None if is_cpu(trace) else _Segments(trace)
    rows = [_row(trace, lt, segments, point, k) for point, k in _points(trace, lt, every_n_events)]
    return _frame(rows)


def _frame(rows: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=list(FRAGMENTATION_COLUMNS))
    for c in FRAGMENTATION_COLUMNS:
        if c.endswith("_bytes") or c in ("event_index", "ts_us", "step"):
            df[c] = df[c].astype("Int64")
    df["fragmentation_ratio"] = df["fragmentation_ratio"].astype(float)
    return df


def fragmentation_at_peak(trace, lt: Lifetimes | None = None) -> dict:
    """The state at the peak as one dict of FRAGMENTATION_COLUMNS (None where the CPU backend has none)."""
    lt = lt or lifetimes(trace)
    segments = None if is_cpu(trace) else _Segments(trace)
    row = _row(trace, lt, segments, "peak", peak(trace, lt).event_index)
    return {c: None if v is None or (isinstance(v, float) and np.isnan(v)) else v for c, v in row.items()}


def allocator_counters(trace) -> pd.DataFrame:
    """The steps table's memory_stats() counters as the allocator reported them, one row per step."""
    return trace.steps.sort_values("step", kind="stable").reset_index(drop=True).copy()
