"""Why reserved exceeds allocated: the gap at the peak of reserved memory, split into its causes.

At one moment (by default the peak of reserved bytes, at its fullest event) the replayed
address space (fragmentation.py) is cut into:

    reserved = allocated + pending free + inactive split + free segments + unplaced

- pending free: blocks whose free was requested but waits on another stream's work
  (record_stream, cross-stream use): active, not allocated, not reusable yet;
- inactive split: free bytes inside segments that also hold live blocks, which only a
  request that fits between those blocks can use (torch's inactive_split);
- free segments: segments kept by the cache with nothing in them (what empty_cache returns);
- unplaced: allocated bytes the replay counts but no block of the replayed segments holds
  (0 in a consistent trace; shown so the parts add up to the byte whatever happens).

Where the trace records segment pools, free bytes in private pools (CUDA graphs) are
counted apart from the rest. Inside allocated bytes, the rounding of requests up to the
allocator's block sizes (block bytes - requested bytes) is counted too, so that
reserved - requested = rounding + the gap.

Each hole inside a used segment is put down to the free that left it: the allocation freed
last, at or before the moment, whose block started inside the hole; a hole no freed block
started in is the untouched rest of a segment.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from profiler.analysis.columns import int_column, is_cpu
from profiler.analysis.fragmentation import _layout, _occupied, _Segments
from profiler.analysis.holes import BEFORE_CAPTURE, HOLE_COLUMNS, NEVER_USED, hole_sources, hole_table  # noqa: F401
from profiler.analysis.live import Lifetimes, lifetimes, live_at
from profiler.analysis.sites import site_labels
from profiler.analysis.timeline import reserved_bytes, step_spans
from profiler.trace.schema import BlockState

_MIB = 1 << 20


@dataclass(frozen=True)
class Suggestion:
    """One thing to try, with the trace's own figure for it (None where the trace has none)."""

    action: str
    figure_bytes: int | None
    why: str


@dataclass(frozen=True)
class Explanation:
    """explain()'s answer. Byte counts are exact ints; `parts` sums to gap_bytes to the byte."""

    has_segments: bool
    event_index: int | None = None
    at_reserved_peak: bool = True
    step: int | None = None
    phase: str | None = None
    reserved_bytes: int | None = None
    allocated_bytes: int | None = None
    requested_bytes: int | None = None
    gap_bytes: int | None = None
    parts: dict[str, int] = field(default_factory=dict)
    private_pools_known: bool = False
    rounding_bytes: int | None = None
    split_share: float | None = None
    expandable_segments: bool | None = None
    holes: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=list(HOLE_COLUMNS)))
    pending: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=["stream", "module", "bytes"]))
    step_free_segments: pd.DataFrame = field(default_factory=pd.DataFrame)
    suggestions: list[Suggestion] = field(default_factory=list)
    verdict: str = ""


PART_NAMES = ("pending_free", "inactive_split", "free_segments", "private_pools", "unplaced")


def reserved_peak_index(trace, lt: Lifetimes) -> int:
    """The event at which reserved bytes first reach their maximum, moved on to the fullest
    event (most allocated) of that plateau: the request the last segment was made for is in."""
    reserved = reserved_bytes(trace)
    if reserved is None or len(reserved) == 0:
        return -1
    top = reserved == reserved.max()
    first = int(np.argmax(top))
    after = np.flatnonzero(~top[first:])
    stop = first + (int(after[0]) if len(after) else len(top) - first)
    return first + int(np.argmax(lt.allocated_bytes[first:stop]))


def _pools(trace) -> dict[int, bool] | None:
    """segment_addr -> whether it is in a private pool, where the snapshots say; None if they never do."""
    seg = trace.segments
    if "segment_pool" not in seg or seg["segment_pool"].isna().all():
        return None
    known = seg.dropna(subset=["segment_pool"]).drop_duplicates("segment_addr")
    return {int(a): str(p) not in ("", "0,0") for a, p in zip(known["segment_addr"], known["segment_pool"])}


def address_space(trace, lt: Lifetimes, k: int, segments: _Segments | None = None) -> pd.DataFrame:
    """fragmentation.segment_map_at's layout at event k, with a `whole_free` flag per segment.
    `segments`: a replay to advance (k only grows between calls), or None for a new one."""
    segments = segments or _Segments(trace)
    segments.advance_to(k)
    layout = _layout(*segments.arrays(), _occupied(trace, lt, k))
    free = layout["state"].to_numpy() == BlockState.INACTIVE.value
    used = np.unique(layout["segment_addr"].to_numpy()[~free])
    layout["whole_free"] = ~np.isin(layout["segment_addr"].to_numpy(), used)
    return layout


def _parts(layout: pd.DataFrame, reserved: int, allocated: int, pools: dict | None) -> dict[str, int]:
    state = layout["state"].to_numpy()
    size = layout["size_bytes"].to_numpy(np.int64)
    free = state == BlockState.INACTIVE.value
    private = (
        np.array([pools.get(int(a), False) for a in layout["segment_addr"]], dtype=bool)
        if pools
        else np.zeros(len(layout), bool)
    )
    whole = layout["whole_free"].to_numpy(bool)
    parts = {
        "pending_free": int(size[state == BlockState.ACTIVE_PENDING_FREE.value].sum()),
        "inactive_split": int(size[free & ~whole & ~private].sum()),
        "free_segments": int(size[free & whole & ~private].sum()),
        "private_pools": int(size[free & private].sum()),
    }
    parts["unplaced"] = reserved - allocated - sum(parts.values())
    return parts


def pending_table(trace, lt: Lifetimes, k: int) -> pd.DataFrame:
    """Blocks pending free at event k, by the stream of their free and their module."""
    live = live_at(trace, k, lt, active=True)
    live = live[live["state"] == BlockState.ACTIVE_PENDING_FREE.value]
    if live.empty:
        return pd.DataFrame(columns=["stream", "module", "bytes"])
    ev = trace.events
    idx = live["alloc_index"].to_numpy(np.int64)
    stream = np.where(idx >= 0, int_column(ev, "stream", fill=-1)[np.maximum(idx, 0)], -1)
    df = pd.DataFrame({"stream": stream, "module": live["module"].to_numpy(object), "bytes": live["size_bytes"]})
    out = df.groupby(["stream", "module"], dropna=False, sort=False)["bytes"].sum().reset_index()
    return out.sort_values("bytes", ascending=False, kind="stable").reset_index(drop=True)


def rounding_bytes(trace, lt: Lifetimes, k: int) -> tuple[int, int]:
    """(block bytes - requested bytes over the blocks allocated at k, requested bytes then)."""
    live = live_at(trace, k, lt)
    live = live[live["addr"].notna()]
    requested = live["requested_bytes"].fillna(live["size_bytes"]).astype(np.int64)
    return int((live["size_bytes"] - requested).sum()), int(requested.sum())


def free_segments_at_step_ends(trace, lt: Lifetimes, most: int = 64) -> pd.DataFrame:
    """step, free_segment_bytes: what an empty_cache() at the end of each step would hand back
    (segments with nothing in them, private pools excepted: empty_cache leaves those). At most
    `most` step ends, evenly spread and the last kept: each costs a pass over the allocations."""
    spans = step_spans(trace, lt)
    if len(spans) > most:
        spans = spans.iloc[np.unique(np.linspace(0, len(spans) - 1, most).round().astype(np.int64))]
    pools = _pools(trace) or {}
    rows = []
    segments = _Segments(trace)
    for step, k in zip(spans["step"].tolist(), spans["event_index_end"].tolist()):
        layout = address_space(trace, lt, k, segments)
        whole = (layout["state"].to_numpy() == BlockState.INACTIVE.value) & layout["whole_free"].to_numpy(bool)
        whole &= ~np.array([pools.get(int(a), False) for a in layout["segment_addr"]], dtype=bool)
        rows.append((int(step), int(layout["size_bytes"].to_numpy(np.int64)[whole].sum())))
    return pd.DataFrame(rows, columns=["step", "free_segment_bytes"]).astype(np.int64)


def varying_sites(trace) -> set[int]:
    """stack_ids whose set of request sizes differs from one step to another (variable shapes).

    A step's sizes are a subset of the site's; the sets are all equal exactly when every step
    where the site allocates has as many distinct sizes as the site has in all."""
    ev = trace.events
    allocs = ev[(ev["action"] == "alloc") & ev["stack_id"].notna() & ev["step"].notna()]
    if allocs.empty:
        return set()
    keys = pd.DataFrame(
        {
            "stack_id": allocs["stack_id"].to_numpy(np.int64),
            "step": allocs["step"].to_numpy(np.int64),
            "size": allocs["size_bytes"].to_numpy(np.int64),
        }
    ).drop_duplicates()
    per_step = keys.groupby(["stack_id", "step"]).size()
    overall = keys.drop_duplicates(["stack_id", "size"]).groupby("stack_id").size()
    short = per_step < overall.reindex(per_step.index.get_level_values("stack_id")).to_numpy()
    return {int(s) for s in per_step.index.get_level_values("stack_id")[short.to_numpy()]}


def _suggest_expandable(e: Explanation) -> list[Suggestion]:
    split = e.parts["inactive_split"]
    if e.expandable_segments or split == 0:
        return []
    return [
        Suggestion(
            "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True",
            split,
            f"{split:,} B ({e.split_share:.1%} of reserved) sit in holes between live blocks; expandable "
            "segments map pages onto one growing segment per stream instead of cutting new segments into blocks",
        )
    ]


def _suggest_max_split(e: Explanation, trace, sources: pd.DataFrame) -> list[Suggestion]:
    """Blocks larger than max_split_size are never cut for a smaller request: set just above the
    largest request whose free left a hole in a large segment, those holes cannot form."""
    if e.expandable_segments or e.parts["inactive_split"] == 0:
        return []
    large = (sources["segment_bytes"].to_numpy(np.int64) > 20 * _MIB) & (sources["alloc_index"].to_numpy() >= 0)
    figure = int(sources["size_bytes"].to_numpy(np.int64)[large].sum())
    if figure == 0:
        return []
    requests = int_column(trace.events, "size_bytes")[sources["alloc_index"].to_numpy(np.int64)[large]]
    mib = max(21, math.ceil((int(requests.max()) + 1) / _MIB))  # torch takes no value under 20 MiB
    return [
        Suggestion(
            f"PYTORCH_CUDA_ALLOC_CONF=max_split_size_mb:{mib}",
            figure,
            f"{figure:,} B of the holes in segments over 20 MiB were left by requests of at most {mib} MiB;"
            f" cached blocks over {mib} MiB would no longer be cut for them",
        )
    ]


def _suggest_buckets(e: Explanation, varying: set[int]) -> list[Suggestion]:
    h = e.holes
    mask = h["stack_id"].notna() & h["stack_id"].fillna(-1).astype(np.int64).isin(list(varying))
    figure = int(h.loc[mask, "bytes"].sum())
    if figure == 0:
        return []
    sites = h.loc[mask].head(3)["site"].tolist()
    return [
        Suggestion(
            "pad variable-length batches to a few fixed lengths (buckets), or preallocate a growing cache",
            figure,
            f"{figure:,} B of the holes were left by allocations whose sizes change from step to step"
            f" ({'; '.join(sites)}), so a freed block rarely fits the next request",
        )
    ]


def _suggest_empty_cache(e: Explanation) -> list[Suggestion]:
    ends = e.step_free_segments["free_segment_bytes"]
    # The last step end is the end of the job, where freeing everything is no news.
    typical = int(ends.iloc[:-1].median()) if len(ends) > 1 else int(ends.sum())
    if typical == 0 and e.parts["free_segments"] == 0:
        return []
    return [
        Suggestion(
            "torch.cuda.empty_cache() where segments sit empty",
            max(typical, e.parts["free_segments"]),
            f"{'at the reserved peak' if e.at_reserved_peak else 'then'} {e.parts['free_segments']:,} B are in"
            " segments with nothing in them, and at a"
            f" typical step end (the median) {typical:,} B: memory other processes could use, which this process"
            " would have to reserve again",
        )
    ]


def _suggest_pending(e: Explanation) -> list[Suggestion]:
    pending = e.parts["pending_free"]
    if pending == 0:
        return []
    return [
        Suggestion(
            "free cross-stream tensors on their own stream, or synchronize before the peak",
            pending,
            f"{pending:,} B were freed but wait on another stream's work (record_stream) and cannot be reused yet",
        )
    ]


def _verdict(e: Explanation) -> str:
    gap, reserved = e.gap_bytes or 0, e.reserved_bytes or 0
    where = f"step {e.step}" + (f", {e.phase}" if e.phase else "")
    moment = f"At the peak of reserved memory ({where})"
    if not e.at_reserved_peak:
        moment = f"At event {e.event_index:,} ({where})"
    if reserved == 0:
        return "Nothing was reserved."
    named = {
        "inactive_split": "in holes between live blocks",
        "free_segments": "in wholly free segments",
        "pending_free": "pending free on another stream",
        "private_pools": "free in private pools",
    }
    causes = sorted(((e.parts[k], v) for k, v in named.items() if e.parts[k]), reverse=True)
    said = ", ".join(f"{b:,} B {v}" for b, v in causes) or "nothing"
    share = gap / reserved
    weight = "little to win back" if share < 0.05 else "worth winning back" if share < 0.2 else "a large share"
    return f"{moment}, {gap:,} B of {reserved:,} B reserved ({share:.1%}) are not allocated, {weight}: {said}."


def explain(trace, lt: Lifetimes | None = None, event_index: int | None = None) -> Explanation:
    """The gap between reserved and allocated bytes at `event_index` (default: reserved_peak_index),
    its causes in exact bytes, where the holes came from, and what to try. On the CPU backend,
    which has no segments, Explanation(has_segments=False)."""
    if is_cpu(trace) or len(trace.events) == 0:
        return Explanation(has_segments=False)
    lt = lt or lifetimes(trace)
    k = reserved_peak_index(trace, lt) if event_index is None else int(event_index)
    layout = address_space(trace, lt, k)
    sources = hole_sources(trace, lt, k, layout)
    reserved = int(layout["size_bytes"].sum())
    allocated = int(lt.allocated_bytes[k]) if k >= 0 else trace.baseline_bytes
    pools = _pools(trace)
    parts = _parts(layout, reserved, allocated, pools)
    rounding, requested = rounding_bytes(trace, lt, k)
    ev = trace.events
    step, phase = (ev["step"].iloc[k], ev["phase"].iloc[k]) if k >= 0 else (None, None)
    settings = trace.meta.get("allocator_settings")
    e = Explanation(
        has_segments=True,
        event_index=k,
        at_reserved_peak=event_index is None,
        step=None if step is None or pd.isna(step) else int(step),
        phase=None if phase is None or pd.isna(phase) else str(phase),
        reserved_bytes=reserved,
        allocated_bytes=allocated,
        requested_bytes=requested,
        gap_bytes=reserved - allocated,
        parts=parts,
        private_pools_known=pools is not None,
        rounding_bytes=rounding,
        split_share=parts["inactive_split"] / reserved if reserved else None,
        expandable_segments=settings.get("expandable_segments") if isinstance(settings, dict) else None,
        holes=hole_table(trace, sources, site_labels(trace.frames, trace.stacks)),
        pending=pending_table(trace, lt, k),
        step_free_segments=free_segments_at_step_ends(trace, lt),
    )
    suggestions = (
        _suggest_expandable(e)
        + _suggest_max_split(e, trace, sources)
        + _suggest_buckets(e, varying_sites(trace))
        + _suggest_empty_cache(e)
        + _suggest_pending(e)
    )
    return _with(e, suggestions=suggestions, verdict=_verdict(e))


def _with(e: Explanation, **changes) -> Explanation:
    from dataclasses import replace

    return replace(e, **changes)
