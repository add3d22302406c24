"""finalize/markers.py: step boundaries and role positions from the markers in a CUDA event stream."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from profiler.trace import schema
from profiler.trace.finalize import markers
from profiler.trace.tags import make_tag

FWD = make_tag("forward", "l1")
# Tag dictionary: index 0 an ordinary tag, 1 and 2 markers 0 (step 1) and 1 (step 2).
DICTIONARY = [FWD, markers.marker_tag(0, 1), markers.marker_tag(1, 2)]
# alloc, marker 0 (alloc, free_requested, free_completed), alloc, marker 1 (alloc, free_completed), free
TAGS = np.array([0, 1, 1, 1, 0, 2, 2, -1])
ACTIONS = np.array(
    ["alloc", "alloc", "free_requested", "free_completed", "alloc", "alloc", "free_completed", "free_completed"],
    dtype=object,
)


def test_marker_tags_round_trip():
    assert markers.marker_tag(3, 7) == "#m:3:7"
    assert markers.parse_marker("#m:3:7") == (3, 7)
    for not_a_marker in (None, "", FWD, "#m:x:1", "#m:1", "#m:1:2:3"):
        assert markers.parse_marker(not_a_marker) is None, not_a_marker


def test_marker_positions_point_past_each_markers_free():
    ids, steps, after = markers.marker_positions(DICTIONARY, TAGS, ACTIONS)
    assert ids.tolist() == [0, 1] and steps.tolist() == [1, 2]
    assert after.tolist() == [4, 7]  # just past free_completed at 3 and at 6


def test_a_marker_without_its_free_starts_after_its_alloc():
    ids, steps, after = markers.marker_positions(
        DICTIONARY, np.array([0, 1, 0]), np.array(["alloc", "alloc", "alloc"], dtype=object)
    )
    assert (ids.tolist(), steps.tolist(), after.tolist()) == ([0], [1], [2])


def test_steps_from_markers():
    steps = markers.steps_from_markers(8, np.array([1, 2]), np.array([1, 5]))
    assert steps.tolist() == [0, 1, 1, 1, 1, 2, 2, 2] and steps.dtype == np.int32
    assert markers.steps_from_markers(3, np.array([]), np.array([]), first_step=4).tolist() == [4, 4, 4]


def _events(tags: list, actions: list) -> pa.Table:
    n = len(tags)
    return pa.table(
        {
            "ts_us": pa.array(range(n), pa.int64()),
            "action": pa.array(actions, schema.STR),
            "addr": pa.array([0x100 * i for i in range(n)], pa.int64()),
            "size_bytes": pa.array([512] * n, pa.int64()),
            "stream": pa.array([0] * n, pa.int64()),
            "step": pa.array([0] * n, pa.int32()),
            "tag": pa.array(tags, schema.STR),
            "stack_id": pa.array([None] * n, pa.int32()),
        },
        schema=schema.RAW_EVENTS,
    )


def _roles(event_index: list) -> pa.Table:
    n = len(event_index)
    rows = {
        "ts_us": [0] * n,
        "event_index": event_index,
        "step": [0] * n,
        "addr": [0] * n,
        "size_bytes": [512] * n,
        "role": ["parameter"] * n,
        "name": ["w"] * n,
    }
    return pa.table(rows, schema=schema.TABLES["roles"])


def test_resolve_fills_steps_and_role_positions():
    tags = [DICTIONARY[i] if i >= 0 else None for i in TAGS]
    # A role registered after marker 1 is stored as -(1 + 1); one with an exact position keeps it.
    events, roles = markers.resolve(_events(tags, ACTIONS.tolist()), _roles([-2, 3, -1]))
    assert events.column("step").to_pylist() == [0, 1, 1, 1, 1, 2, 2, 2]
    assert roles.column("event_index").to_pylist() == [7, 3, 4]


def test_resolve_leaves_a_stream_without_markers_alone():
    events, roles = _events([FWD, None], ["alloc", "free_completed"]), _roles([-1])
    same_events, same_roles = markers.resolve(events, roles)
    assert same_events is events and same_roles is roles
    empty = schema.RAW_EVENTS.empty_table()
    assert markers.resolve(empty, roles)[0] is empty
