"""A multi-rank (torchrun) run: its ranks compared one by one and summed up as one job.

Functions here take what profiler.trace.layout reads: RankRecords (each rank's meta.json
and cached summary, or the error that kept it from being read) and loaded Traces. A
missing or unreadable rank is a row with its error; it never stops the other ranks
from being shown.

Peaks are the allocator's own (meta.max_allocated_bytes, what torch.cuda.max_memory_allocated
reported on that rank) where the rank recorded one, else the replayed peak of its events
(a rank that died before finalizing has only journals and no allocator maximum).

The functions that take a run directory (read_ranks, rank_table, rank_categories,
rank_timelines, run_group_summary) and the rank=N partition helpers live in
profiler.trace.layout, which reads the ranks and calls the functions here.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from profiler.analysis.categories import category_names
from profiler.analysis.columns import int_column
from profiler.analysis.summary import tokens_per_second
from profiler.analysis.timeline import memory_timeline, step_spans
from profiler.errors import TraceError, one_line
from profiler.trace import schema
from profiler.trace.meta import world_size_of as _world_size
from profiler.trace.model import RUNNING, RankRecord

# Statuses a capture writes when it ends; a rank without one is live or died mid-capture.
FINAL_STATUSES = tuple(s.value for s in schema.Status)
RANK_COLUMNS = (
    "rank",
    "world_size",
    "hostname",
    "local_rank",
    "status",
    "peak_allocated_bytes",
    "peak_reserved_bytes",
    "replayed_peak_bytes",
    "median_step_time_us",
    "steps",
    "events",
    "skew_pct",
    "is_max",
    "error",
    "path",
)
_INT_COLUMNS = (
    "world_size",
    "local_rank",
    "peak_allocated_bytes",
    "peak_reserved_bytes",
    "replayed_peak_bytes",
    "steps",
    "events",
)
# Peak facts a job summary takes from the rank with the largest peak, so that they describe one moment
# on one GPU (its categories sum to the job's per-GPU peak).
_AT_PEAK_KEYS = (
    "peak_allocated_bytes",
    "peak_event_index",
    "peak_step",
    "peak_phase",
    "active_at_peak_bytes",
    "fragmentation_ratio_at_peak",
    "reserved_minus_allocated_at_peak_bytes",
    "inactive_split_at_peak_bytes",
    "largest_free_block_at_peak_bytes",
    "categories_at_peak_bytes",
)
# Per-GPU maxima: the largest over the ranks.
_MAX_KEYS = (
    "peak_active_bytes",
    "peak_reserved_bytes",
    "allocator_max_allocated_bytes",
    "allocator_max_reserved_bytes",
)


def _int(value) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


# -- the rank table -----------------------------------------------------------------------


def _peak_of(record: RankRecord, meta_key: str, summary_key: str) -> int | None:
    """The allocator's value from meta where the rank recorded one, else the summary's replayed one;
    None for a rank that cannot be read (its meta alone may be stale or wrong)."""
    if record.summary is None:
        return None
    value = _int((record.meta or {}).get(meta_key))
    return value if value is not None else _int(record.summary.get(summary_key))


def _died_note(records: list[RankRecord]) -> str | None:
    # A rank still "running" when others have ended most likely died before it could finalize.
    if any(r.status in FINAL_STATUSES for r in records):
        return "no final status although other ranks finished: the process likely died (journals only)"
    return None


def _rank_row(r: RankRecord, world: int, died: str | None) -> dict:
    s = r.summary or {}
    meta = r.meta or {}
    error = r.error
    if error is None and r.status == RUNNING and died:
        error = f"{r.path}: {died}"
    return {
        "rank": r.rank,
        "world_size": _world_size(r.meta) or world,
        "hostname": meta.get("hostname") if isinstance(meta.get("hostname"), str) else None,
        "local_rank": _int(meta.get("local_rank")),
        "status": r.status,
        "peak_allocated_bytes": _peak_of(r, "max_allocated_bytes", "peak_allocated_bytes"),
        "peak_reserved_bytes": _peak_of(r, "max_reserved_bytes", "peak_reserved_bytes"),
        "replayed_peak_bytes": _int(s.get("peak_allocated_bytes")),
        "median_step_time_us": s.get("median_step_time_us"),
        "steps": _int(s.get("steps")),
        "events": _int(s.get("events")),
        "error": error,
        "path": str(r.path),
    }


def rank_table_of(records: list[RankRecord]) -> pd.DataFrame:
    """One row per rank (RANK_COLUMNS), missing and unreadable ranks included with their error.

    peak_allocated_bytes / peak_reserved_bytes: the allocator's maxima on that rank (see the module
    docstring); replayed_peak_bytes: the peak of its events. skew_pct: the peak against the median of
    the ranks' peaks, in percent; is_max marks the one rank with the largest peak (the first of ties).
    `records`: layout.read_ranks(run_root).
    """
    died = _died_note(records)
    world = max([r.rank + 1 for r in records] + [_world_size(r.meta) or 0 for r in records], default=0)
    rows = [_rank_row(r, world, died) for r in records]
    table = pd.DataFrame(rows, columns=[c for c in RANK_COLUMNS if c not in ("skew_pct", "is_max")])
    for column in _INT_COLUMNS:
        table[column] = pd.array(table[column].tolist(), dtype="Int64")
    table["rank"] = table["rank"].astype(np.int64)
    table["median_step_time_us"] = pd.to_numeric(table["median_step_time_us"], errors="coerce").astype(float)
    skew = rank_skew(table)
    median = skew["median_bytes"]
    peaks = table["peak_allocated_bytes"].to_numpy(dtype=float, na_value=np.nan)
    table["skew_pct"] = (peaks - median) / median * 100.0 if median else np.nan
    table["is_max"] = table["rank"] == skew["max_rank"] if skew["max_rank"] is not None else False
    return table[list(RANK_COLUMNS)]


def rank_skew(table: pd.DataFrame) -> dict:
    """How unevenly the ranks' peaks spread, over the ranks with a known peak.

    max_bytes/max_rank, min_bytes/min_rank (first of ties), median_bytes, max_min_ratio (None when the
    smallest peak is 0), spread_bytes (max - min), skew_pct (max against the median), ranks (how many
    counted). Every value is None when no rank has a peak.
    """
    known = table[table["peak_allocated_bytes"].notna()]
    out = dict.fromkeys(
        ("max_bytes", "max_rank", "min_bytes", "min_rank", "median_bytes", "max_min_ratio", "spread_bytes", "skew_pct")
    )
    out["ranks"] = int(len(known))
    if known.empty:
        return out
    peaks = known["peak_allocated_bytes"].to_numpy(dtype=np.int64)
    ranks = known["rank"].to_numpy(dtype=np.int64)
    hi, lo = int(np.argmax(peaks)), int(np.argmin(peaks))
    median = float(np.median(peaks))
    out.update(
        max_bytes=int(peaks[hi]),
        max_rank=int(ranks[hi]),
        min_bytes=int(peaks[lo]),
        min_rank=int(ranks[lo]),
        median_bytes=median,
        spread_bytes=int(peaks[hi] - peaks[lo]),
        max_min_ratio=float(peaks[hi] / peaks[lo]) if peaks[lo] else None,
        skew_pct=float((peaks[hi] - median) / median * 100.0) if median else None,
    )
    return out


# -- per-rank views -------------------------------------------------------------------------


def readable_ranks(records: list[RankRecord], ranks=None) -> list[RankRecord]:
    """The records with a summary, of the rank numbers in `ranks` (default: all)."""
    readable = [r for r in records if r.summary is not None]
    if ranks is None:
        return readable
    wanted = {int(r) for r in ranks}
    return [r for r in readable if r.rank in wanted]


def step_aligned(timeline: pd.DataFrame, spans: pd.DataFrame) -> np.ndarray:
    """x per timeline row: its step plus its fraction of the way through that step's events,
    so that runs (or ranks) of different lengths and speeds line up step by step."""
    x = np.full(len(timeline), np.nan)
    if spans.empty or timeline.empty:
        return x
    steps = spans["step"].to_numpy(np.int64)
    start = spans["event_index_start"].to_numpy(np.int64)
    width = np.maximum(spans["event_index_end"].to_numpy(np.int64) - start + 1, 1)
    idx = timeline["event_index"].to_numpy(np.int64)
    pos = np.clip(np.searchsorted(start, idx, side="right") - 1, 0, len(start) - 1)
    return steps[pos] + np.clip((idx - start[pos]) / width[pos], 0, 1)


TIMELINE_COLUMNS = ("rank", "step", "x", "ts_s", "event_index", "allocated_bytes")
# memory_timeline and step_spans need no more than these.
TIMELINE_TABLES = ("events", "segments")


def rank_timelines_of(traces, max_points: int = 2000) -> pd.DataFrame:
    """Allocated bytes over time per rank, long format (TIMELINE_COLUMNS), from timeline.memory_timeline.

    traces: (rank, Trace) pairs, each loaded with at least TIMELINE_TABLES. x: step-aligned position
    (step_aligned), so that ranks overlay; ts_s: seconds since that rank's first event. Each rank is
    downsampled to about max_points rows, keeping its peak.
    """
    frames = []
    for rank, trace in traces:
        if trace.events.empty:
            continue
        tl = memory_timeline(trace, max_points=max_points)
        first = int(int_column(trace.events, "ts_us")[0])
        frames.append(
            pd.DataFrame(
                {
                    "rank": np.full(len(tl), rank, dtype=np.int64),
                    "step": int_column(tl, "step", fill=-1),
                    "x": step_aligned(tl, step_spans(trace)),
                    "ts_s": (int_column(tl, "ts_us") - first) / 1e6,
                    "event_index": tl["event_index"].to_numpy(np.int64),
                    "allocated_bytes": tl["allocated_bytes"].to_numpy(np.int64),
                }
            )
        )
    if not frames:
        return pd.DataFrame({c: pd.Series(dtype=float if c in ("x", "ts_s") else np.int64) for c in TIMELINE_COLUMNS})
    return pd.concat(frames, ignore_index=True)


def rank_categories_of(records: list[RankRecord], ranks=None) -> pd.DataFrame:
    """Bytes per category at each rank's own peak: rank, one column per category, peak_allocated_bytes.

    From each readable rank's summary (of the rank numbers in `ranks`, default all), whose
    categories_at_peak_bytes is categories.category_at_peak: the category columns of a row sum to
    that rank's replayed peak (peak_allocated_bytes here).
    """
    chosen = [(r.rank, r.summary) for r in readable_ranks(records, ranks) if r.summary is not None]
    seen = {c for _, summary in chosen for c in (summary.get("categories_at_peak_bytes") or {})}
    names = category_names(seen)
    rows = []
    for rank, summary in chosen:
        at_peak = summary.get("categories_at_peak_bytes") or {}
        rows.append([rank] + [int(at_peak.get(c, 0)) for c in names] + [int(summary["peak_allocated_bytes"])])
    return pd.DataFrame(rows, columns=["rank", *names, "peak_allocated_bytes"]).astype(np.int64)


# -- the whole job as one summary -----------------------------------------------------------


def job_status(records: list[RankRecord]) -> str:
    """complete when every rank completed; running while none has ended; oom, error, terminated or
    capture_failed when a rank ended so (in that order); incomplete when ranks are missing, unreadable
    or died while others finished."""
    statuses = [r.status for r in records]
    if statuses and all(s == schema.Status.COMPLETE.value for s in statuses):
        return schema.Status.COMPLETE.value
    ended = (schema.Status.OOM, schema.Status.ERROR, schema.Status.TERMINATED, schema.Status.CAPTURE_FAILED)
    for status in (s.value for s in ended):
        if status in statuses:
            return status
    if statuses and all(s == RUNNING for s in statuses):
        return RUNNING
    return "incomplete"


def _max_of(values) -> int | float | None:
    known = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return max(known) if known else None


def run_group_summary_of(records: list[RankRecord], root) -> dict:
    """The job as one run summary (summary.run_summary's keys), usable wherever one run's summary is.

    Labels (run_id, name, backend, device, config, ...) are rank 0's (the first readable rank's if rank 0
    is not). Peaks are per GPU: peak_allocated_bytes and the facts at that moment (categories, where,
    fragmentation) are those of the rank with the largest peak; peak_reserved/active and the allocator
    maxima are the largest over the ranks. median_step_time_us is the slowest rank's (the job waits on
    it). steps: the fewest any rank recorded; events and events_dropped: summed. Added: world_size,
    ranks_readable, failed_ranks (missing, unreadable, or not complete once the job has ended),
    peak_rank, peak_skew_pct, peak_max_min_ratio, peak_spread_bytes. `root`: the job's directory,
    for the TraceError raised when no rank can be read.
    """
    ok = [(r.rank, r.summary) for r in records if r.summary is not None]
    if not ok:
        first = next((r.error for r in records if r.error), "no rank=N partitions")
        raise TraceError(one_line(f"{root}: no rank of this multi-rank run can be read ({first})"))
    base = next((summary for rank, summary in ok if rank == 0), ok[0][1])
    summaries = [summary for _, summary in ok]
    skew = rank_skew(rank_table_of(records))
    # The rank the table marks as largest (allocator maxima), so the job agrees with the Ranks page.
    top_rank, top = next(((rank, s) for rank, s in ok if rank == skew["max_rank"]), None) or max(
        ok, key=lambda pair: (pair[1].get("peak_allocated_bytes") or 0, -pair[0])
    )
    status = job_status(records)
    out = dict(base)
    out.update({k: top.get(k) for k in _AT_PEAK_KEYS})
    out.update({k: _max_of(s.get(k) for s in summaries) for k in _MAX_KEYS})
    step_time = _max_of(s.get("median_step_time_us") for s in summaries)
    matches = [s.get("replay_matches_allocator") for s in summaries]
    categories = {c for s in summaries for c in (s.get("category_peak_bytes") or {})}
    out.update(
        status=status,
        steps=min(int(s.get("steps") or 0) for s in summaries),
        events=sum(int(s.get("events") or 0) for s in summaries),
        events_dropped=sum(int(s.get("events_dropped") or 0) for s in summaries),
        median_step_time_us=step_time,
        tokens_per_s=tokens_per_second(base.get("config"), step_time),
        replay_matches_allocator=None if all(m is None for m in matches) else all(m is not False for m in matches),
        category_peak_bytes={
            c: max(int((s.get("category_peak_bytes") or {}).get(c, 0)) for s in summaries) for c in sorted(categories)
        },
        world_size=max(len(records), _world_size({"config": base.get("config")}) or 0),
        ranks_readable=len(ok),
        failed_ranks=[
            r.rank
            for r in records
            if r.summary is None or (status != RUNNING and r.status != schema.Status.COMPLETE.value)
        ],
        peak_rank=top_rank,
        peak_skew_pct=skew["skew_pct"],
        peak_max_min_ratio=skew["max_min_ratio"],
        peak_spread_bytes=skew["spread_bytes"],
    )
    return out


def ranks_to_overlay(table: pd.DataFrame, skew: dict, most: int = 4) -> list[int]:
    """Ranks worth overlaying first: rank 0, the largest and the smallest peak, then the next largest."""
    readable = table[table["replayed_peak_bytes"].notna()]
    by_peak = readable.sort_values("peak_allocated_bytes", ascending=False, kind="stable")["rank"].tolist()
    picks = [0, skew.get("max_rank"), skew.get("min_rank"), *by_peak]
    ok = set(readable["rank"].tolist())
    return [int(r) for r in dict.fromkeys(p for p in picks if p in ok)][:most]
