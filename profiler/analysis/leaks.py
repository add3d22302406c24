"""Memory that keeps growing from step to step: where it was allocated, and how fast it grows.

What is alive at the end of each completed step is grouped by allocation site (the user's
line, sites.py) and module. A group's bytes at successive step ends tell what it is:

- leak: it grows at every step end from its first one on, and is still growing at the
  last (at least LEAK_MIN_GROWTHS growths): a list that keeps tensors, a history of losses;
- still filling: the same growth, in the kv_cache category (a cache that grows per token
  during decoding is doing its job, and is named, not flagged);
- filled once: it grew and then stopped (a cache that fills, a lazily made buffer);
- steady: created once (at the first step: optimizer state, gradients) and flat since;
- shrinking or varying: anything else.

An allocation is counted at a step end when it was allocated at or before that event and
its free was not requested by then (allocated bytes, as timeline.py counts them).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from profiler.analysis.live import Lifetimes, lifetimes
from profiler.analysis.sites import site_labels, site_of
from profiler.analysis.summary import step_counts
from profiler.analysis.timeline import step_spans
from profiler.trace.schema import Category

LEAK_MIN_GROWTHS = 2
LEAK, FILLING, FILLED, STEADY, OTHER = "leak", "still filling", "filled once", "steady", "shrinking or varying"
GROWTH_COLUMNS = (
    "module",
    "site",
    "category",
    "kind",
    "first_step",
    "first_bytes",
    "last_bytes",
    "growth_bytes",
    "bytes_per_step",
    "exact_per_step",
)


@dataclass(frozen=True)
class Growth:
    """leaks()'s answer: the step ends looked at, bytes per group at each, and each group's kind."""

    steps: list[int]
    allocated_at_step_end: list[int]
    table: pd.DataFrame  # GROWTH_COLUMNS, one row per group alive at some step end, leaks first
    by_step: pd.DataFrame = field(default_factory=pd.DataFrame)  # group x step bytes (same row order)

    @property
    def suspects(self) -> pd.DataFrame:
        return self.table[self.table["kind"] == LEAK]

    @property
    def verdict(self) -> str:
        n = len(self.steps)
        if n < LEAK_MIN_GROWTHS + 1:
            return f"Too few completed steps ({n}) to tell growth from warm-up: at least {LEAK_MIN_GROWTHS + 1} needed."
        leaks = self.suspects
        if leaks.empty:
            return f"Nothing keeps growing over {n} step ends."
        per_step = int(leaks["bytes_per_step"].sum())
        top = leaks.iloc[0]
        return (
            f"{len(leaks)} allocation site(s) keep growing over {n} step ends, {per_step:,} B per step in all;"
            f" the largest: {top['site']}"
            + (f" in {top['module']}" if top["module"] else "")
            + f", {int(top['bytes_per_step']):,} B per step since step {int(top['first_step'])}."
        )


def _step_ends(trace, lt: Lifetimes) -> tuple[list[int], np.ndarray]:
    """Completed steps and the last event of each (a trailing partial step is the tail, not a step)."""
    completed, _ = step_counts(trace)
    spans = step_spans(trace, lt)
    spans = spans[spans["step"] < completed] if completed else spans.iloc[:0]
    return spans["step"].astype(int).tolist(), spans["event_index_end"].to_numpy(np.int64)


def _alive_spans(trace, lt: Lifetimes, ends: np.ndarray) -> pd.DataFrame:
    """Allocations alive at one step end or more: size, group keys and the range [i0, i1) of step ends."""
    ev = trace.events
    i0 = np.searchsorted(ends, lt.alloc_index, side="left")  # first end at or after the alloc
    i1 = np.searchsorted(ends, lt.release_index, side="left")  # first end at or after the release
    keep = np.flatnonzero(i1 > i0)
    idx = lt.alloc_index[keep]
    return pd.DataFrame(
        {
            "size_bytes": lt.size_bytes[keep],
            "module": ev["module"].astype(object).to_numpy()[idx] if len(ev) else [],
            "stack_id": ev["stack_id"].astype("Int64").to_numpy()[idx] if len(ev) else [],
            "category": ev["category"].astype(object).to_numpy()[idx] if len(ev) else [],
            "i0": i0[keep],
            "i1": i1[keep],
        }
    )


def _by_step(alive: pd.DataFrame, labels: dict[int, str], n: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(group keys, group x step-end bytes): a difference array per group, summed over its allocations.

    A group is a site and category; allocations without a stack are grouped by module instead.
    A site's module is the one holding most of its bytes (sampled module hooks may name several)."""
    alive = alive.assign(site=[site_of(s, labels) for s in alive["stack_id"]])
    for c in ("module", "category"):
        alive[c] = pd.Series([v if isinstance(v, str) else None for v in alive[c]], index=alive.index, dtype=object)
    alive["by_module"] = alive["module"].where(alive["stack_id"].isna(), None)
    keys = ["site", "by_module", "category"]
    codes, groups = pd.MultiIndex.from_frame(alive[keys].fillna("\0")).factorize()
    grid = np.zeros((len(groups), n + 1), dtype=np.int64)
    np.add.at(grid, (codes, alive["i0"].to_numpy()), alive["size_bytes"].to_numpy(np.int64))
    np.add.at(grid, (codes, alive["i1"].to_numpy()), -alive["size_bytes"].to_numpy(np.int64))
    keys_df = pd.DataFrame([[None if v == "\0" else v for v in g] for g in groups], columns=keys, dtype=object)
    weight = alive.assign(code=codes, main=alive["module"].fillna("")).groupby(["code", "main"])["size_bytes"].sum()
    main = weight.sort_values(ascending=False, kind="stable").reset_index().drop_duplicates("code")
    module = dict(zip(main["code"].tolist(), main["main"].tolist()))
    keys_df["module"] = pd.Series([module.get(i) or None for i in range(len(groups))], dtype=object)
    return keys_df[["module", "site", "category"]], pd.DataFrame(np.cumsum(grid, axis=1)[:, :n])


def _kind(row: np.ndarray, category) -> str:
    seen = np.flatnonzero(row > 0)
    deltas = np.diff(row[seen[0] :]) if len(seen) else np.array([], np.int64)
    if len(deltas) == 0 or not deltas.any():
        return STEADY
    if (deltas > 0).all() and len(deltas) >= LEAK_MIN_GROWTHS:
        return FILLING if category == Category.KV_CACHE.value else LEAK
    if (deltas >= 0).all():
        return FILLED
    return OTHER


def leaks(trace, lt: Lifetimes | None = None) -> Growth:
    """Bytes alive at each completed step's end, by site and module, and which groups leak."""
    lt = lt or lifetimes(trace)
    steps, ends = _step_ends(trace, lt)
    alive = _alive_spans(trace, lt, ends)
    keys, grid = _by_step(alive, site_labels(trace.frames, trace.stacks), len(ends))
    rows = []
    for (module, site, category), bytes_at in zip(keys.itertuples(index=False), grid.to_numpy()):
        seen = np.flatnonzero(bytes_at > 0)
        first = int(seen[0]) if len(seen) else 0
        deltas = np.diff(bytes_at[first:])
        growing = deltas[deltas > 0]
        rows.append(
            {
                "module": module,
                "site": site,
                "category": category,
                "kind": _kind(bytes_at, category),
                "first_step": steps[first] if steps else None,
                "first_bytes": int(bytes_at[first]) if len(bytes_at) else 0,
                "last_bytes": int(bytes_at[-1]) if len(bytes_at) else 0,
                "growth_bytes": int(bytes_at[-1] - bytes_at[first]) if len(bytes_at) else 0,
                "bytes_per_step": int(np.median(growing)) if len(growing) else 0,
                "exact_per_step": bool(len(growing)) and bool((deltas == deltas[0]).all()),
            }
        )
    table = pd.DataFrame(rows, columns=list(GROWTH_COLUMNS))
    table["module"] = pd.Series([m if isinstance(m, str) else None for m in table["module"]], dtype=object)
    order = np.lexsort((-table["growth_bytes"].to_numpy(), (table["kind"] != LEAK).to_numpy()))
    table = table.iloc[order].reset_index(drop=True)
    by_step = grid.iloc[order].reset_index(drop=True)
    by_step.columns = steps
    allocated = [int(lt.allocated_bytes[k]) for k in ends]
    return Growth(steps=steps, allocated_at_step_end=allocated, table=table, by_step=by_step)
