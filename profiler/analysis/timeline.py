"""Memory over time: allocated, active and reserved bytes after every event.

The allocator's own accounting (DeviceCachingAllocator::free): a free lowers
allocated bytes when it is requested (the free_requested event) and active bytes
when the block is really released (free_completed: at once, or once the block's
pending stream uses are done). So, after each event,

    allocated = baseline allocated + allocs - free_requested
    active    = baseline active    + allocs - free_completed

in block bytes, where baseline active is baseline allocated plus the blocks that
were already pending free when capture began. A trace without a single
free_requested (an older CPU capture) lowers both at free_completed.

Every byte count is an int64 running sum. Float would round above 2**53 and,
worse, lose the exact match with the allocator's own `max_allocated_bytes`
that a trace is checked against.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from profiler.analysis.columns import (
    ALLOC,
    FREE_COMPLETED,
    FREE_REQUESTED,
    OTHER_KIND,  # noqa: F401  (the event kinds' old home)
    action_mask,
    codes_of,
    event_bytes,
    event_kinds,
    int_column,
    is_cpu,
    runs,
)
from profiler.analysis.downsample import downsample, downsample_index  # noqa: F401  (downsample: its old home)
from profiler.trace.schema import Action, BlockState, SnapshotKind

_GROW = (Action.SEGMENT_ALLOC.value, Action.SEGMENT_MAP.value)
_SHRINK = (Action.SEGMENT_FREE.value, Action.SEGMENT_UNMAP.value)


# -- the replay ---------------------------------------------------------------------


def has_free_requests(kinds: np.ndarray) -> bool:
    """Whether allocated bytes drop at free_requested (else, in older traces, at free_completed)."""
    return bool((kinds == FREE_REQUESTED).any())


def release_kind(kinds: np.ndarray) -> int:
    """The event kind at which a block stops counting as allocated in this trace."""
    return FREE_REQUESTED if has_free_requests(kinds) else FREE_COMPLETED


def _start_blocks(trace, state: str) -> pd.DataFrame:
    seg = trace.segments
    if seg.empty:
        return seg
    return seg[(seg["snapshot"] == SnapshotKind.START.value) & (seg["state"] == state)]


def baseline_pending_bytes(trace) -> int:
    """Bytes of blocks that were pending free (active, no longer allocated) when capture began."""
    return int(int_column(_start_blocks(trace, BlockState.ACTIVE_PENDING_FREE.value), "block_bytes").sum())


def baseline_active_bytes(trace) -> int:
    return trace.baseline_bytes + baseline_pending_bytes(trace)


def _fallback_skips(trace, kinds: np.ndarray, addr: np.ndarray) -> np.ndarray:
    """Without free_requested events, the free_completed events that release blocks pending
    free at the start: those blocks were never in allocated bytes, so their frees must not
    lower it. Rare (a CUDA trace has requests); empty almost always."""
    pending = _start_blocks(trace, BlockState.ACTIVE_PENDING_FREE.value)
    if pending.empty or has_free_requests(kinds):
        return np.array([], np.int64)
    block = kinds >= 0
    hit = np.flatnonzero(block & np.isin(addr, int_column(pending, "block_addr")))
    # The first block event at each such address, when it is a free: it ends the pending block.
    _, first = np.unique(addr[hit], return_index=True)
    first = hit[first]
    return first[kinds[first] == FREE_COMPLETED]


def _kinds_and_sizes(trace, kinds, size) -> tuple[np.ndarray, np.ndarray]:
    """kinds and block bytes per event: the caller's, or computed."""
    ev = trace.events
    kinds = event_kinds(ev) if kinds is None else kinds
    size = event_bytes(ev) if size is None else size
    return kinds, size


def allocated_delta(
    trace, kinds: np.ndarray | None = None, size: np.ndarray | None = None, plus: np.ndarray | None = None
) -> np.ndarray:
    """Per event, the change in allocated bytes: +block at alloc, -block at free_requested
    (at free_completed in a trace without requests), 0 elsewhere. Its cumsum plus the
    baseline is allocated_bytes(); category_timeline splits it by category.
    `plus`: np.where(kinds == ALLOC, size, 0), when the caller has it."""
    kinds, size = _kinds_and_sizes(trace, kinds, size)
    delta = np.where(kinds == ALLOC, size, 0) if plus is None else plus.copy()
    release = release_kind(kinds)
    delta -= np.where(kinds == release, size, 0)
    if release == FREE_COMPLETED:
        delta[_fallback_skips(trace, kinds, int_column(trace.events, "addr"))] = 0
    return delta


def allocated_bytes(
    trace, kinds: np.ndarray | None = None, size: np.ndarray | None = None, plus: np.ndarray | None = None
) -> np.ndarray:
    """Allocated bytes just after each event: baseline + allocs - requested frees."""
    out = np.cumsum(allocated_delta(trace, kinds, size, plus), dtype=np.int64)
    out += trace.baseline_bytes
    return out


def active_bytes(
    trace, kinds: np.ndarray | None = None, size: np.ndarray | None = None, plus: np.ndarray | None = None
) -> np.ndarray:
    """Active bytes just after each event: baseline active + allocs - completed frees."""
    kinds, size = _kinds_and_sizes(trace, kinds, size)
    delta = np.where(kinds == ALLOC, size, 0) if plus is None else plus.copy()
    delta -= np.where(kinds == FREE_COMPLETED, size, 0)
    out = np.cumsum(delta, dtype=np.int64, out=delta)
    out += baseline_active_bytes(trace)
    return out


def counters(trace, kinds: np.ndarray | None = None, size: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(allocated_bytes, active_bytes) per event, sharing the work the two have in common."""
    kinds, size = _kinds_and_sizes(trace, kinds, size)
    plus = np.where(kinds == ALLOC, size, 0)
    return allocated_bytes(trace, kinds, size, plus), active_bytes(trace, kinds, size, plus)


def start_reserved_bytes(trace) -> int:
    """Sum of segment sizes in the start snapshot (one row per block, so dedupe by segment)."""
    seg = trace.segments
    if seg.empty:
        return 0
    start = seg[seg["snapshot"] == SnapshotKind.START.value]
    per_segment = start.drop_duplicates("segment_addr")
    return int(int_column(per_segment, "segment_bytes").sum())


def reserved_bytes(trace) -> np.ndarray | None:
    """Reserved bytes just after each event; None on the CPU backend, which has no segments."""
    if is_cpu(trace):
        return None
    ev = trace.events
    grow, shrink = action_mask(ev, *_GROW), action_mask(ev, *_SHRINK)
    at = np.flatnonzero(grow | shrink)  # a few hundred events of ten million
    size = int_column(ev, "size_bytes")[at]
    delta = np.zeros(len(ev), dtype=np.int64)
    delta[at] = np.where(grow[at], size, -size)
    out = np.cumsum(delta, dtype=np.int64, out=delta)
    out += start_reserved_bytes(trace)
    return out


def _nullable(values: np.ndarray | None, n: int) -> pd.arrays.IntegerArray:
    # Int64 (nullable) keeps "no such thing on CPU" distinct from zero.
    if values is None:
        return pd.arrays.IntegerArray(np.zeros(n, np.int64), np.ones(n, dtype=bool))
    return pd.arrays.IntegerArray(values, np.zeros(n, dtype=bool))


def memory_timeline(trace, lt=None, max_points: int | None = None) -> pd.DataFrame:
    """One row per event: ts_us, event_index, step, phase, allocated/active/reserved bytes.

    active - allocated is the bytes of blocks whose free was requested but has not
    completed (plus those pending when capture began). reserved is null (pd.NA) on the
    CPU backend. `lt`: live.lifetimes(trace), when the caller has it already (the
    counters are taken from it; nothing else here needs the pairing). `max_points`:
    downsample (as downsample() does) before the frame is built, which spares a plot
    of ten million events most of its cost.
    """
    ev = trace.events
    allocated, active = (lt.allocated_bytes, lt.active_bytes) if lt is not None else counters(trace)
    reserved = reserved_bytes(trace)
    keep: slice | np.ndarray = slice(None)
    if max_points is not None:
        series = [allocated, active] + ([reserved] if reserved is not None else [])
        keep = downsample_index(len(ev), max_points, series)
    event_index = np.arange(len(ev), dtype=np.int64)[keep]
    return pd.DataFrame(
        {
            "ts_us": int_column(ev, "ts_us")[keep],
            "event_index": event_index,
            "step": ev["step"].to_numpy()[keep],
            "phase": ev["phase"].iloc[keep].reset_index(drop=True),
            "allocated_bytes": allocated[keep],
            "active_bytes": active[keep],
            "reserved_bytes": _nullable(None if reserved is None else reserved[keep], len(event_index)),
        }
    )


# -- spans and the peak --------------------------------------------------------------


def _run_table(starts: np.ndarray, ends: np.ndarray, ts: np.ndarray, **keys: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame(
        {
            **{name: key[starts] for name, key in keys.items()},
            "event_index_start": starts,
            "event_index_end": ends,
            "ts_us_start": np.minimum.reduceat(ts, starts),
            "ts_us_end": np.maximum.reduceat(ts, starts),
        }
    )


def step_spans(trace, lt=None) -> pd.DataFrame:
    """Per step: first/last event index and timestamp, and the step's peak allocated and active bytes."""
    ev = trace.events
    cols = [
        "step",
        "event_index_start",
        "event_index_end",
        "ts_us_start",
        "ts_us_end",
        "peak_allocated_bytes",
        "peak_active_bytes",
    ]
    if ev.empty:
        return pd.DataFrame(columns=cols)
    step = int_column(ev, "step", fill=-1)
    allocated, active = (lt.allocated_bytes, lt.active_bytes) if lt is not None else counters(trace)
    starts, ends = runs(step)
    per_run = _run_table(starts, ends, int_column(ev, "ts_us"), step=step)
    per_run["peak_allocated_bytes"] = np.maximum.reduceat(allocated, starts)
    per_run["peak_active_bytes"] = np.maximum.reduceat(active, starts)
    out = (
        per_run[per_run["step"] >= 0]
        .groupby("step", sort=True)
        .agg(
            event_index_start=("event_index_start", "min"),
            event_index_end=("event_index_end", "max"),
            ts_us_start=("ts_us_start", "min"),
            ts_us_end=("ts_us_end", "max"),
            peak_allocated_bytes=("peak_allocated_bytes", "max"),
            peak_active_bytes=("peak_active_bytes", "max"),
        )
    )
    return out.reset_index()[cols]


def phase_spans(trace) -> pd.DataFrame:
    """Per (step, phase) span: timestamps and event indices.

    From the phases table when it has rows (the capture's own boundaries); else the
    first and last event of each (step, phase), which is all an unfinished run offers.
    """
    ev = trace.events
    ts = int_column(ev, "ts_us")
    cols = ["step", "phase", "ts_us_start", "ts_us_end", "event_index_start", "event_index_end"]
    ph = trace.phases
    if not ph.empty:
        out = pd.DataFrame(
            {
                "step": int_column(ph, "step", fill=-1),
                "phase": ph["phase"].astype(object).to_numpy(),
                "ts_us_start": int_column(ph, "ts_us_start"),
                "ts_us_end": int_column(ph, "ts_us_end"),
            }
        )
        # Allocator timestamps only grow, so a span's events are a contiguous range.
        out["event_index_start"] = np.searchsorted(ts, out["ts_us_start"].to_numpy(), side="left")
        out["event_index_end"] = np.searchsorted(ts, out["ts_us_end"].to_numpy(), side="right") - 1
        return out[cols].sort_values(["ts_us_start", "step"], kind="stable").reset_index(drop=True)
    if ev.empty:
        return pd.DataFrame(columns=cols)
    step = int_column(ev, "step", fill=-1)
    codes, names = codes_of(ev["phase"])
    starts, ends = runs(step, codes)
    per_run = _run_table(starts, ends, ts, step=step, code=codes)
    out = (
        per_run[per_run["code"] >= 0]
        .groupby(["step", "code"], sort=False)
        .agg(
            ts_us_start=("ts_us_start", "min"),
            ts_us_end=("ts_us_end", "max"),
            event_index_start=("event_index_start", "min"),
            event_index_end=("event_index_end", "max"),
        )
        .reset_index()
    )
    out["phase"] = [names[c] for c in out["code"]]
    return out[cols].sort_values("event_index_start", kind="stable").reset_index(drop=True)


@dataclass(frozen=True)
class Peak:
    """The first event after which allocated bytes (frees counted when requested) were at their maximum.

    event_index -1 means the start of capture: every event left less than the baseline.
    """

    event_index: int
    ts_us: int | None
    step: int | None
    phase: str | None
    allocated_bytes: int


def peak(trace, lt=None) -> Peak:
    allocated = lt.allocated_bytes if lt is not None else allocated_bytes(trace)
    baseline = trace.baseline_bytes
    # Only a trace that starts by freeing can peak before its first event.
    if len(allocated) == 0 or allocated.max() < baseline:
        return Peak(-1, None, None, None, baseline)
    i = int(np.argmax(allocated))
    ev = trace.events
    step = ev["step"].iloc[i]
    phase = ev["phase"].iloc[i]
    return Peak(
        event_index=i,
        ts_us=int(ev["ts_us"].iloc[i]),
        step=None if pd.isna(step) else int(step),
        phase=None if pd.isna(phase) else str(phase),
        allocated_bytes=int(allocated[i]),
    )
