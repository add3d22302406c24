"""Column access shared by the analysis modules: event kinds, dictionary codes, runs of equal
keys, integer columns and the bytes each event moves.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from profiler.trace.schema import Action, Backend

# Event kinds of the block replay, as event_kinds() codes them.
OTHER_KIND, ALLOC, FREE_REQUESTED, FREE_COMPLETED = -1, 0, 1, 2
_KIND_OF = {
    Action.ALLOC.value: ALLOC,
    Action.FREE_REQUESTED.value: FREE_REQUESTED,
    Action.FREE_COMPLETED.value: FREE_COMPLETED,
}


def action_mask(events: pd.DataFrame, *actions: str) -> np.ndarray:
    """Boolean array: the event's action is one of `actions`.

    Compares dictionary codes, not strings: ten million string compares cost seconds.
    """
    col = events["action"]
    if not isinstance(col.dtype, pd.CategoricalDtype):
        return col.isin(actions).to_numpy(dtype=bool)
    codes = col.cat.codes.to_numpy()
    out = np.zeros(len(codes), dtype=bool)
    for code in np.flatnonzero(col.cat.categories.isin(actions)):
        out |= codes == code
    return out


def event_kinds(events: pd.DataFrame) -> np.ndarray:
    """int8 per event: ALLOC, FREE_REQUESTED, FREE_COMPLETED, or OTHER_KIND (segments, oom, ...).

    One table lookup through the dictionary codes, so every mask after it is one compare.
    """
    col = events["action"]
    if not isinstance(col.dtype, pd.CategoricalDtype):
        col = col.astype("category")
    names = [str(c) for c in col.cat.categories]
    # The extra last slot serves code -1 (a null action).
    table = np.array([_KIND_OF.get(name, OTHER_KIND) for name in names] + [OTHER_KIND], dtype=np.int8)
    return table[col.cat.codes.to_numpy()]


def codes_of(col: pd.Series) -> tuple[np.ndarray, list[str]]:
    """Dictionary codes (-1 for null) and the values they index."""
    if not isinstance(col.dtype, pd.CategoricalDtype):
        col = col.astype("category")
    return col.cat.codes.to_numpy(), [str(c) for c in col.cat.categories]


def runs(*keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """First and last index of each maximal run of events over which every key stays the same.

    Steps and phases arrive as long runs in stream order, so aggregating per run
    and then per key touches thousands of rows instead of millions.
    """
    n = len(keys[0])
    if n == 0:
        return np.array([], np.int64), np.array([], np.int64)
    change = np.zeros(n - 1, dtype=bool)
    for key in keys:
        change |= key[1:] != key[:-1]
    starts = np.concatenate([[0], np.flatnonzero(change) + 1])
    ends = np.concatenate([starts[1:] - 1, [n - 1]])
    return starts, ends


def int_column(df: pd.DataFrame, name: str, fill: int = 0) -> np.ndarray:
    """An integer column as int64, nulls replaced by `fill` (pyarrow hands nullable ints over as float)."""
    if name not in df or len(df) == 0:
        return np.full(len(df), fill, dtype=np.int64)
    return df[name].to_numpy(dtype=np.int64, na_value=fill)


def event_bytes(events: pd.DataFrame) -> np.ndarray:
    """Bytes each block event moves in the allocator's own accounting.

    The allocator counts blocks (requests rounded up, large blocks sometimes handed
    out unsplit), so a trace's block_bytes column wins where it has one; size_bytes,
    the request, stands in for traces and events without it (CPU, segment events).
    """
    if "block_bytes" not in events or len(events) == 0:
        return int_column(events, "size_bytes")
    col = events["block_bytes"]
    if col.dtype == np.int64:  # no nulls: nothing to fill in
        return col.to_numpy()
    block = col.to_numpy(dtype=np.int64, na_value=-1)
    missing = block < 0
    if not missing.any():
        return block
    return np.where(missing, int_column(events, "size_bytes"), block)


def is_cpu(trace) -> bool:
    return trace.backend == Backend.CPU.value
