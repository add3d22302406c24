"""The allocator's slack at every step boundary, which part of it matters, and the segments that hold it.

Four quantities, each with its own meaning:
    cached but free      reserved - active: bytes the caching allocator holds that no block uses
    inactive split       free bytes inside segments that also hold live blocks: they serve only
                         requests that fit between those blocks (torch's inactive_split_bytes)
    largest free block   the largest request the cache can serve without asking the device
    allocator retries    times an allocation failed, the cache was released and the call retried

The first two and the retries are the allocator's own counters (steps table, memory_stats()
at each step end). The largest free block has no counter: it comes from the replayed address
space (fragmentation.replay_at), and is kept only at steps where the replay's reserved bytes
equal the counter, so that it is never drawn from an address space that drifted. (The replay's
inactive split equals the counter too, except in expandable segments, which torch leaves out.)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from profiler.analysis.columns import int_column, is_cpu
from profiler.analysis.fragmentation import replay_at
from profiler.analysis.live import Lifetimes
from profiler.trace.schema import BlockState
from profiler.units import human_bytes

SLACK_COLUMNS = (
    "step",
    "event_index",
    "reserved_bytes",
    "active_bytes",
    "cached_free_bytes",
    "inactive_split_bytes",
    "largest_free_block_bytes",
    "num_alloc_retries",
)
# The four quantities, in the order the page draws them, with the name it gives each.
SLACK_NAMES = {
    "cached_free_bytes": "cached but free",
    "inactive_split_bytes": "inactive split",
    "largest_free_block_bytes": "largest free block",
    "num_alloc_retries": "allocator retries",
}
SPLIT_MATTERS_SHARE = 0.5  # inactive split above this share of cached-free bytes: the cache is fragmented


def _counter(steps: pd.DataFrame, column: str) -> pd.Series:
    if column not in steps:
        return pd.Series(pd.NA, index=steps.index, dtype="Int64")
    return steps[column].astype("Int64")


def _boundary_events(trace, steps: pd.Series) -> list[int]:
    """For each step, its last event or an earlier step's (-1: none yet): the state its counters describe."""
    event_steps = int_column(trace.events, "step", fill=-1)
    index = np.flatnonzero(event_steps >= 0)
    order = np.argsort(event_steps[index], kind="stable")
    # The latest event among those of step <= s, for any s: a running maximum over steps in order.
    latest = np.maximum.accumulate(index[order]) if len(index) else index
    counts = np.searchsorted(event_steps[index][order], steps.to_numpy(np.int64), side="right")
    return [int(latest[n - 1]) if n > 0 else -1 for n in counts]


def slack_by_step(trace, lt: Lifetimes | None = None) -> pd.DataFrame:
    """One row per steps-table row (SLACK_COLUMNS); a quantity the run did not record is null."""
    steps = trace.steps.sort_values("step", kind="stable").reset_index(drop=True)
    out = pd.DataFrame({"step": steps["step"].astype("Int64")})
    out["event_index"] = pd.array(_boundary_events(trace, steps["step"]), dtype="Int64")
    for c in ("reserved_bytes", "active_bytes", "inactive_split_bytes", "num_alloc_retries"):
        out[c] = _counter(steps, c)
    out["cached_free_bytes"] = out["reserved_bytes"] - out["active_bytes"]
    out["largest_free_block_bytes"] = pd.array([pd.NA] * len(out), dtype="Int64")
    if len(out) and not is_cpu(trace):
        replay = replay_at(trace, out["event_index"].astype("int64").tolist(), lt)
        agrees = (replay["reserved_bytes"] == out["reserved_bytes"]).fillna(False).to_numpy(bool)
        out.loc[agrees, "largest_free_block_bytes"] = replay["largest_free_block_bytes"].to_numpy()[agrees]
    return out[list(SLACK_COLUMNS)]


def not_recorded(by_step: pd.DataFrame) -> list[str]:
    """The names (SLACK_NAMES) of the quantities with no value at any step of this run."""
    return [name for c, name in SLACK_NAMES.items() if by_step[c].isna().all()]


@dataclass(frozen=True, slots=True)
class SlackVerdict:
    matters: str  # a SLACK_NAMES key, or "" where there is nothing to judge
    step: int | None  # the step end judged: the first at the most reserved bytes
    at_step: dict  # SLACK_COLUMNS at that step (None where not recorded)
    sentence: str


def _most_reserved_step_end(by_step: pd.DataFrame) -> dict | None:
    known = by_step.dropna(subset=["reserved_bytes", "cached_free_bytes"])
    if known.empty:
        return None
    row = known.loc[known["reserved_bytes"].astype("int64").idxmax()]
    return {c: None if pd.isna(row[c]) else int(row[c]) for c in SLACK_COLUMNS}


def _retried(by_step: pd.DataFrame, where: str, row: dict) -> SlackVerdict | None:
    retries = by_step["num_alloc_retries"].dropna()
    if not len(retries) or int(retries.max()) == 0:
        return None
    first = int(by_step.loc[retries[retries > 0].index[0], "step"])
    return SlackVerdict(
        "num_alloc_retries",
        row["step"],
        row,
        f"Allocator retries matter: {int(retries.max())} by the last step end, the first in step {first}:"
        " no cached block fitted a request, so the allocator released its cache and retried (a synchronizing"
        f" cudaFree each time); {where} {human_bytes(row['cached_free_bytes'])} is cached but free.",
    )


def slack_verdict(by_step: pd.DataFrame) -> SlackVerdict:
    """Which of the four quantities matters, and why, from slack_by_step at the first step end with the most reserved.

    Retries matter whenever there are any: the allocator failed to find a block and released its
    cache to retry. Else the inactive split matters when it is over SPLIT_MATTERS_SHARE of the
    cached-but-free bytes: most free bytes sit between live blocks. Else the cached-but-free bytes
    matter: free blocks kept for reuse, the cache and not fragmentation.
    """
    row = _most_reserved_step_end(by_step)
    if row is None:
        return SlackVerdict("", None, {}, "No allocator counters at the step ends of this run: nothing to judge.")
    reserved = human_bytes(row["reserved_bytes"])
    where = f"at the end of step {row['step']}, the first step end at the most reserved ({reserved}),"
    retried = _retried(by_step, where, row)
    if retried is not None:
        return retried
    free, split, largest = row["cached_free_bytes"], row["inactive_split_bytes"], row["largest_free_block_bytes"]
    if free <= 0:
        return SlackVerdict(
            "", row["step"], row, f"{where[0].upper()}{where[1:]} no reserved byte is free: nothing fragments."
        )
    largest_text = "" if largest is None else f" the largest free block is {human_bytes(largest)};"
    if split is None:
        split_text = "how much of it is split between live blocks is not recorded"
    elif split == 0:
        split_text = "none of it is split between live blocks"
    else:
        split_text = f"{human_bytes(split)} ({100 * split / free:.0f}%) of it is split between live blocks"
    if split is not None and split > SPLIT_MATTERS_SHARE * free:
        return SlackVerdict(
            "inactive_split_bytes",
            row["step"],
            row,
            f"Inactive split matters: {where} {human_bytes(split)} ({100 * split / free:.0f}%) of the"
            f" {human_bytes(free)} cached but free lies between live blocks and serves only requests that"
            f" fit there;{largest_text} no allocation retried.",
        )
    return SlackVerdict(
        "cached_free_bytes",
        row["step"],
        row,
        f"Cached but free matters: {where} {human_bytes(free)} is cached but free and {split_text};{largest_text}"
        " no allocation retried, so this is the cache keeping freed blocks for reuse, not fragmentation.",
    )


SEGMENT_SLACK_COLUMNS = (
    "segment_addr",
    "segment_bytes",
    "used_bytes",
    "free_bytes",
    "inactive_split_bytes",
    "largest_free_block_bytes",
)


def segment_slack(layout: pd.DataFrame, by: str = "inactive_split_bytes") -> pd.DataFrame:
    """fragmentation.segment_map_at's blocks summed per segment (SEGMENT_SLACK_COLUMNS), the most
    `by` first ("inactive_split_bytes" or "free_bytes", ranking_for gives the one a verdict
    asks for), then the most free bytes, then the largest segment."""
    if layout.empty:
        return pd.DataFrame({c: pd.Series([], dtype="int64") for c in SEGMENT_SLACK_COLUMNS})
    free = layout["state"].to_numpy() == BlockState.INACTIVE.value
    size = layout["size_bytes"].to_numpy(np.int64)
    d = pd.DataFrame(
        {
            "segment_addr": layout["segment_addr"].to_numpy(np.int64),
            "segment_bytes": layout["segment_bytes"].to_numpy(np.int64),
            "used_bytes": np.where(free, 0, size),
            "free_bytes": np.where(free, size, 0),
        }
    )
    per = d.groupby("segment_addr", sort=True).agg(
        segment_bytes=("segment_bytes", "first"), used_bytes=("used_bytes", "sum"), free_bytes=("free_bytes", "sum")
    )
    per["inactive_split_bytes"] = np.where(per["used_bytes"] > 0, per["free_bytes"], 0)
    per["largest_free_block_bytes"] = d[free].groupby("segment_addr")["free_bytes"].max()
    per["largest_free_block_bytes"] = per["largest_free_block_bytes"].fillna(0).astype("int64")
    per = per.reset_index().sort_values(
        [by, "free_bytes", "segment_bytes", "segment_addr"],
        ascending=[False, False, False, True],
        kind="stable",
    )
    return per[list(SEGMENT_SLACK_COLUMNS)].reset_index(drop=True)


def ranking_for(verdict: SlackVerdict) -> str:
    """The segment_slack column that holds what the verdict names: the split bytes where it is the
    inactive split, else all free bytes (wholly free segments included: the cache, or the blocks a
    retried request found too small)."""
    return "inactive_split_bytes" if verdict.matters == "inactive_split_bytes" else "free_bytes"


def collapse_segments(layout: pd.DataFrame, top: int | None, by: str = "inactive_split_bytes") -> pd.DataFrame:
    """The blocks of the `top` segments segment_slack ranks first by `by` (all where top is None),
    in that order, each segment's blocks by address."""
    ranked = segment_slack(layout, by)["segment_addr"]
    kept = ranked if top is None else ranked.iloc[:top]
    rank = pd.Series(np.arange(len(kept)), index=kept.to_numpy())
    out = layout[layout["segment_addr"].isin(kept)].copy()
    out["_rank"] = out["segment_addr"].map(rank)
    return out.sort_values(["_rank", "block_addr"], kind="stable").drop(columns="_rank").reset_index(drop=True)
