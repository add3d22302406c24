"""Step boundaries and role positions, read back from markers in the event stream.

Draining the allocator's history at every step costs a snapshot per step. So
at a step boundary the CUDA backend instead drops a *marker* into the stream:
a 512-byte allocation, freed at once, tagged "#m:<id>:<step>". It costs a few
microseconds, and it is exact: the allocator orders it with every other event.
Offline, each event's step is the step of the last marker before it, and a
role registered after marker <id> belongs at that marker's position.

Markers are real allocations, so they stay in the trace (the allocator's own
counters include them); they carry no module and category "other".
"""

from __future__ import annotations

import numpy as np

PREFIX = "#m:"


def marker_tag(marker_id: int, step: int) -> str:
    return f"{PREFIX}{marker_id}:{step}"


def parse_marker(tag: str | None) -> tuple[int, int] | None:
    if not tag or not tag.startswith(PREFIX):
        return None
    try:
        marker_id, step = tag[len(PREFIX) :].split(":")
        return int(marker_id), int(step)
    except ValueError:
        return None


def marker_positions(tag_dictionary: list, tag_indices: np.ndarray, action: np.ndarray):
    """(ids, steps, positions) of marker allocs, in stream order.

    `position` is the index just past the marker's own free_completed (or its
    alloc when the free is missing), i.e. where "after the marker" begins.
    """
    parsed = [parse_marker(t) for t in tag_dictionary]
    is_marker_tag = np.array([p is not None for p in parsed] + [False])
    idx = np.where(tag_indices < 0, len(parsed), tag_indices)
    marked = is_marker_tag[idx]
    allocs = np.flatnonzero(marked & (action == "alloc"))
    frees = np.flatnonzero(marked & (action == "free_completed"))
    ids = np.array([parsed[tag_indices[i]][0] for i in allocs], dtype=np.int64)
    steps = np.array([parsed[tag_indices[i]][1] for i in allocs], dtype=np.int64)
    # The free that follows each marker alloc (markers are freed before anything else happens
    # on that thread; another thread's events may interleave, which is harmless).
    k = np.searchsorted(frees, allocs, side="right")
    after = np.where(
        k < len(frees), frees[np.minimum(k, max(len(frees) - 1, 0))] + 1 if len(frees) else allocs + 1, allocs + 1
    )
    return ids, steps, after


def steps_from_markers(
    n: int, marker_steps: np.ndarray, marker_alloc_index: np.ndarray, first_step: int = 0
) -> np.ndarray:
    """Step of every event: the step announced by the last marker at or before it."""
    if len(marker_alloc_index) == 0:
        return np.full(n, first_step, dtype=np.int32)
    k = np.searchsorted(marker_alloc_index, np.arange(n), side="right") - 1
    values = np.concatenate([[first_step], marker_steps])
    return values[k + 1].astype(np.int32)


def resolve(events, roles):
    """Fill events' steps and roles' positions from markers (pyarrow tables in, out).

    A no-op for streams without markers (the CPU backend writes exact values itself).
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    if events.num_rows == 0:
        return events, roles
    tag = events.column("tag").combine_chunks()
    if not pa.types.is_dictionary(tag.type):
        tag = pc.dictionary_encode(tag)
    dictionary = tag.dictionary.to_pylist()
    if not any(t and t.startswith(PREFIX) for t in dictionary):
        return events, roles
    act = events.column("action").combine_chunks()
    if pa.types.is_dictionary(act.type):
        act_values = np.array(act.dictionary.to_pylist() + [None], dtype=object)
        action = act_values[act.indices.fill_null(-1).to_numpy(zero_copy_only=False)]
    else:
        action = np.array(act.to_pylist(), dtype=object)
    indices = tag.indices.fill_null(-1).to_numpy(zero_copy_only=False)
    ids, steps, after = marker_positions(dictionary, indices, action)
    alloc_at = _marker_alloc_indices(dictionary, indices, action)
    step_col = steps_from_markers(len(action), steps, alloc_at)
    events = events.set_column(events.schema.get_field_index("step"), "step", pa.array(step_col, pa.int32()))
    if roles.num_rows:
        pos = roles.column("event_index").to_numpy(zero_copy_only=False).copy()
        by_id = dict(zip(ids.tolist(), after.tolist()))
        neg = pos < 0
        pos[neg] = [by_id.get(int(-(v + 1)), -1) for v in pos[neg]]
        roles = roles.set_column(roles.schema.get_field_index("event_index"), "event_index", pa.array(pos, pa.int64()))
    return events, roles


def _marker_alloc_indices(dictionary, indices, action) -> np.ndarray:
    is_marker_tag = np.array([parse_marker(t) is not None for t in dictionary] + [False])
    idx = np.where(indices < 0, len(dictionary), indices)
    return np.flatnonzero(is_marker_tag[idx] & (action == "alloc"))
