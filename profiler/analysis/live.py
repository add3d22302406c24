"""What is alive at a moment: every allocation with its lifetime, and breakdowns of the live set.

An allocation is *allocated* from its alloc until its free_requested, and *active*
until its free_completed (the allocator keeps a block whose stream uses are still
pending). In a trace without any free_requested (an older CPU capture) the two
coincide at free_completed. See timeline.py for the byte counts these match.

Lifetimes come from one vectorised pairing of allocs with frees by address
(pair_frees): events are in the allocator's stream order, so the free that ends
an allocation is the first free of its kind at its address after it, before the
next alloc there.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from profiler.analysis.columns import ALLOC, FREE_COMPLETED, FREE_REQUESTED, event_bytes, event_kinds, int_column
from profiler.analysis.timeline import baseline_active_bytes, counters, peak, release_kind
from profiler.trace.schema import BlockState, SnapshotKind

LIVE_COLUMNS = (
    "addr",
    "size_bytes",
    "requested_bytes",
    "module",
    "phase",
    "category",
    "stack_id",
    "alloc_index",
    "state",
)
ALLOCATED = BlockState.ACTIVE_ALLOCATED.value
PENDING_FREE = BlockState.ACTIVE_PENDING_FREE.value
BASELINE_COLUMNS = (
    "addr",
    "size_bytes",
    "requested_bytes",
    "category",
    "stack_id",
    "pending_at_start",
    "release_index",
    "end_index",
)


@dataclass(frozen=True)
class Lifetimes:
    """Per allocation, the event indices that bound its life; `n_events` stands for "never".

    alloc_index is sorted. An allocation is allocated on [alloc_index, release_index)
    and active on [alloc_index, end_index): release_index is its free_requested (its
    free_completed in a trace without requests), end_index its free_completed. Between
    the two it is pending free. Baseline blocks (alive when capture began) are in
    `baseline` (BASELINE_COLUMNS), with release_index -1 for those already pending free then.
    allocated_bytes and active_bytes are the per-event counters of timeline.py.
    """

    n_events: int
    alloc_index: np.ndarray
    release_index: np.ndarray
    end_index: np.ndarray
    addr: np.ndarray
    size_bytes: np.ndarray  # what the allocator counts (timeline.event_bytes)
    requested_bytes: np.ndarray  # what the program asked for
    baseline: pd.DataFrame
    allocated_bytes: np.ndarray
    active_bytes: np.ndarray
    # live_at's answers for this pairing, by (event index, active): a report asks for the
    # set alive at the peak from several sections.
    live_sets: dict = field(default_factory=dict, repr=False, compare=False)


@dataclass(frozen=True)
class Pairing:
    """pair_frees' answer. Per alloc (in stream order): the first free_requested and the first
    free_completed that belong to it (n if none). Per address whose history starts with frees
    (blocks that pre-date capture): the first such free of each kind (n if none)."""

    alloc_index: np.ndarray
    request_index: np.ndarray
    complete_index: np.ndarray
    orphan_addr: np.ndarray
    orphan_request: np.ndarray
    orphan_complete: np.ndarray


def previous_at_address(addr: np.ndarray) -> np.ndarray:
    """For each event, the index of the previous event at the same address (-1 if none).

    A hash group-by's shift: one pass in stream order, which at ten million events
    costs about half of sorting by (address, position).
    """
    n = len(addr)
    if n == 0:
        return np.array([], np.int64)
    index = pd.Series(np.arange(n, dtype=np.int64))
    return index.groupby(addr, sort=False).shift(1).to_numpy(dtype=np.int64, na_value=-1)


def pair_frees(kinds: np.ndarray, addr: np.ndarray) -> Pairing:
    """Pair every free with the latest alloc at its address before it.

    Walk each event's chain of previous events at its address until an alloc: with
    pointer jumping, whose first round settles a well-formed trace (a request's previous
    event is its alloc, a completion's its request) and whose later rounds only touch
    the unusual rest. Other events at an address (segments) are stepped over.
    """
    n = len(kinds)
    alloc_index = np.flatnonzero(kinds == ALLOC)
    request = np.full(len(alloc_index), n, dtype=np.int64)
    complete = np.full(len(alloc_index), n, dtype=np.int64)
    owner = previous_at_address(addr)
    is_alloc = kinds == ALLOC
    owner[alloc_index] = alloc_index  # an alloc owns itself
    todo = np.flatnonzero(~is_alloc & (owner >= 0))
    while len(todo):
        todo = todo[~is_alloc[owner[todo]]]  # still pointing at a non-alloc
        owner[todo] = owner[owner[todo]]
        todo = todo[owner[todo] >= 0]
    rank = np.empty(n, dtype=np.int64)  # event index -> position in alloc_index (read at allocs only)
    rank[alloc_index] = np.arange(len(alloc_index), dtype=np.int64)
    orphan_index = {}
    for of_kind, out in ((FREE_REQUESTED, request), (FREE_COMPLETED, complete)):
        frees = np.flatnonzero(kinds == of_kind)
        by = owner[frees]
        paired = by >= 0
        # The first free of a kind per alloc wins: a second one is a double free.
        np.minimum.at(out, rank[by[paired]], frees[paired])
        orphan_index[of_kind] = frees[~paired]
    # Frees before any alloc at their address end blocks that pre-date capture: the first of each kind.
    orphans = np.concatenate(list(orphan_index.values()))
    orphan_addr = np.unique(addr[orphans])
    at = {}
    for of_kind, frees in orphan_index.items():
        first_addr, first = np.unique(addr[frees], return_index=True)
        at[of_kind] = np.full(len(orphan_addr), n, dtype=np.int64)
        at[of_kind][np.searchsorted(orphan_addr, first_addr)] = frees[first]
    return Pairing(alloc_index, request, complete, orphan_addr.astype(np.int64), at[FREE_REQUESTED], at[FREE_COMPLETED])


def _lookup(keys: np.ndarray, values: np.ndarray, wanted: np.ndarray, missing: int) -> np.ndarray:
    pos = pd.Index(keys).get_indexer(wanted) if len(keys) else np.full(len(wanted), -1)
    return np.where(pos >= 0, values[np.maximum(pos, 0)] if len(values) else missing, missing)


def _baseline(trace, pairing: Pairing, release: int, n: int) -> pd.DataFrame:
    seg = trace.segments
    if seg.empty:
        return pd.DataFrame({c: [] for c in BASELINE_COLUMNS})
    start = seg[(seg["snapshot"] == SnapshotKind.START.value) & seg["state"].isin([ALLOCATED, PENDING_FREE])]
    addr = int_column(start, "block_addr")
    block = int_column(start, "block_bytes")
    requested = int_column(start, "requested_bytes", fill=-1)
    pending = (start["state"] == PENDING_FREE).to_numpy(dtype=bool)
    orphan_release = pairing.orphan_request if release == FREE_REQUESTED else pairing.orphan_complete
    return pd.DataFrame(
        {
            "addr": addr,
            "size_bytes": block,
            "requested_bytes": np.where(requested >= 0, requested, block),
            "category": start["category"].astype(object).to_numpy() if "category" in start else None,
            "stack_id": start["stack_id"].astype("Int64").to_numpy() if "stack_id" in start else None,
            "pending_at_start": pending,
            "release_index": np.where(pending, -1, _lookup(pairing.orphan_addr, orphan_release, addr, n)),
            "end_index": _lookup(pairing.orphan_addr, pairing.orphan_complete, addr, n).astype(np.int64),
        }
    )


def lifetimes(trace) -> Lifetimes:
    """Pair every alloc with the free_requested and free_completed that end it."""
    ev = trace.events
    n = len(ev)
    addr = int_column(ev, "addr")
    size = event_bytes(ev)
    kinds = event_kinds(ev)
    pairing = pair_frees(kinds, addr)
    release = release_kind(kinds)
    idx = pairing.alloc_index
    allocated, active = counters(trace, kinds, size)
    return Lifetimes(
        n_events=n,
        alloc_index=idx,
        release_index=pairing.request_index if release == FREE_REQUESTED else pairing.complete_index,
        end_index=pairing.complete_index,
        addr=addr[idx],
        size_bytes=size[idx],
        requested_bytes=int_column(ev, "size_bytes")[idx],
        baseline=_baseline(trace, pairing, release, n),
        allocated_bytes=allocated,
        active_bytes=active,
    )


def _check_index(event_index: int, n: int) -> int:
    if not -1 <= event_index < n:
        raise ValueError(f"event_index {event_index} is outside the trace's {n} events (-1 is the start)")
    return int(event_index)


def live_at(trace, event_index: int, lt: Lifetimes | None = None, active: bool = False) -> pd.DataFrame:
    """Allocations alive just after event `event_index` (-1: when capture began), baseline blocks included.

    active=False: the allocated set (size_bytes sums to allocated bytes); active=True: the
    active set, which adds the blocks pending free (size_bytes sums to active bytes).
    Columns (LIVE_COLUMNS): addr, size_bytes (the allocator's block bytes), requested_bytes,
    module, phase, category, stack_id, alloc_index (-1 for a baseline block), state
    (active_allocated or active_pending_free). When the replayed bytes differ from the
    sum of known blocks (memory that pre-dates a CPU capture, dropped events), one row
    with a null addr and state holds the difference.
    """
    lt = lt or lifetimes(trace)
    k = _check_index(event_index, lt.n_events)
    known_set = lt.live_sets.get((k, active))
    if known_set is None:
        if len(lt.live_sets) >= _LIVE_SETS_KEPT:  # a dashboard's moments come and go: keep the last few
            del lt.live_sets[next(iter(lt.live_sets))]
        known_set = lt.live_sets[(k, active)] = _live_set(trace, lt, k, active)
    return known_set.copy()  # callers add columns to it


_LIVE_SETS_KEPT = 4


def _live_set(trace, lt: Lifetimes, k: int, active: bool) -> pd.DataFrame:
    parts = [p for p in (_baseline_alive(lt, k, active), _captured_alive(trace, lt, k, active)) if len(p)]
    known = sum(int(p["size_bytes"].sum()) for p in parts)
    if k >= 0:
        total = int((lt.active_bytes if active else lt.allocated_bytes)[k])
    else:
        total = baseline_active_bytes(trace) if active else trace.baseline_bytes
    if total != known:
        parts.append(_unknown_blocks(total - known))
    return _typed(parts)


def _captured_alive(trace, lt: Lifetimes, k: int, active: bool) -> pd.DataFrame:
    """The captured allocations alive just after event k."""
    made = int(np.searchsorted(lt.alloc_index, k, side="right"))  # allocs at or before k
    stop = (lt.end_index if active else lt.release_index)[:made]
    alive = np.flatnonzero(stop > k)
    idx = lt.alloc_index[alive]
    ev = trace.events
    return pd.DataFrame(
        {
            "addr": lt.addr[alive],
            "size_bytes": lt.size_bytes[alive],
            "requested_bytes": lt.requested_bytes[alive],
            "module": _take(ev, "module", idx),
            "phase": _take(ev, "phase", idx),
            "category": _take(ev, "category", idx),
            "stack_id": ev["stack_id"].iloc[idx].astype("Int64").to_numpy() if len(idx) else [],
            "alloc_index": idx,
            "state": np.where(lt.release_index[alive] > k, ALLOCATED, PENDING_FREE).astype(object),
        }
    )


def _baseline_alive(lt: Lifetimes, k: int, active: bool) -> pd.DataFrame:
    """The blocks of the start snapshot still alive just after event k."""
    base = lt.baseline
    base = base[(base["end_index" if active else "release_index"].to_numpy(np.int64) > k)]
    return pd.DataFrame(
        {
            "addr": base["addr"].to_numpy(np.int64),
            "size_bytes": base["size_bytes"].to_numpy(np.int64),
            "requested_bytes": base["requested_bytes"].to_numpy(np.int64),
            "module": None,
            "phase": None,
            "category": base["category"].to_numpy(object),
            "stack_id": base["stack_id"].to_numpy(),
            "alloc_index": -1,
            "state": np.where(base["release_index"].to_numpy(np.int64) > k, ALLOCATED, PENDING_FREE).astype(object),
        }
    )


def _unknown_blocks(size_bytes: int) -> pd.DataFrame:
    """One row for bytes the replay counts but no known block holds."""
    return pd.DataFrame(
        {
            "addr": [pd.NA],
            "size_bytes": [size_bytes],
            "requested_bytes": [pd.NA],
            "module": [None],
            "phase": [None],
            "category": [None],
            "stack_id": [pd.NA],
            "alloc_index": [-1],
            "state": [None],
        }
    )


def _take(events: pd.DataFrame, name: str, idx: np.ndarray) -> np.ndarray:
    return events[name].iloc[idx].astype(object).to_numpy() if len(idx) else np.array([], object)


def _typed(parts: list[pd.DataFrame]) -> pd.DataFrame:
    empty = pd.DataFrame({c: [] for c in LIVE_COLUMNS})
    df = pd.concat([empty] + parts, ignore_index=True) if parts else empty
    for c in ("addr", "stack_id", "requested_bytes"):
        df[c] = df[c].astype("Int64")
    for c in ("size_bytes", "alloc_index"):
        df[c] = df[c].astype(np.int64)
    for c in ("module", "phase", "category", "state"):
        df[c] = df[c].astype(object).where(df[c].notna(), None)
    return df[list(LIVE_COLUMNS)]


def alive_at_peak(trace, lt: Lifetimes | None = None, active: bool = False) -> pd.DataFrame:
    """live_at the peak of allocated bytes (with active=True, the active set at that moment)."""
    lt = lt or lifetimes(trace)
    return live_at(trace, peak(trace, lt).event_index, lt, active=active)


def breakdown(live_df: pd.DataFrame, by: str | list[str]) -> pd.DataFrame:
    """Bytes and count of a live set grouped by `by`, largest first, with each group's share.

    A null key (no module, no stack) stays null: it is a group of its own, not dropped.
    """
    keys = [by] if isinstance(by, str) else list(by)
    df = live_df[keys + ["size_bytes"]].copy()
    for k in keys:
        df[k] = df[k].astype(object)
    # The unattributed row (null addr) is bytes, not an allocation: it adds no count.
    df["_is_block"] = live_df["addr"].notna().to_numpy() if "addr" in live_df else True
    g = df.groupby(keys, dropna=False, sort=False)
    out = pd.DataFrame(
        {"total_bytes": g["size_bytes"].sum().astype(np.int64), "count": g["_is_block"].sum().astype(np.int64)}
    )
    out = out.reset_index()
    for k in keys:  # group-by hands a null key back as NaN
        out[k] = out[k].astype(object).where(out[k].notna(), None)
    total = int(out["total_bytes"].sum())
    out["share"] = out["total_bytes"] / total if total else 0.0
    return out.sort_values(["total_bytes", "count"], ascending=False, kind="stable").reset_index(drop=True)
