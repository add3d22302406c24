"""finalize/classify.py: pairing frees with allocs, and each rule that gives an allocation its category."""

from __future__ import annotations

import numpy as np

from profiler.trace.finalize.classify import CATEGORY_VALUES, classify_events, next_free, pair_with_allocs


def _objects(values) -> np.ndarray:
    return np.array(values, dtype=object)


def test_pair_with_allocs_finds_the_latest_earlier_alloc_at_the_address():
    action = _objects(["alloc", "alloc", "free_completed", "alloc", "free_completed", "free_completed", "oom"])
    addr = np.array([0xA, 0xB, 0xA, 0xA, 0xA, 0xC, 0xA])
    is_alloc = action == "alloc"
    is_free = action == "free_completed"
    # An alloc is its own match; 0xC was never allocated; oom is no member.
    assert pair_with_allocs(is_alloc, is_free, addr).tolist() == [0, 1, 0, 3, 3, -1, -1]


def test_next_free_is_the_earliest_free_of_each_alloc():
    action = _objects(["alloc", "free_requested", "free_completed", "alloc"])
    addr = np.array([0xA, 0xA, 0xA, 0xB])
    is_free = action != "alloc"
    alloc_of = pair_with_allocs(action == "alloc", is_free, addr)
    assert next_free(alloc_of, is_free, 4).tolist() == [1, 4, 4, 4]  # 0xB is never freed: n


def _names(codes: np.ndarray) -> list:
    return [CATEGORY_VALUES[c] if c >= 0 else None for c in codes.tolist()]


def _classify(events, roles=(), baseline=()):
    action, addr, phase, hint = (list(c) for c in zip(*events))
    role_addr, role_index, role_name = (list(c) for c in zip(*roles)) if roles else ([], [], [])
    codes, baseline_codes = classify_events(
        action=_objects(action),
        addr=np.array(addr),
        phase=_objects(phase),
        hint=_objects(hint),
        role_addr=np.array(role_addr, np.int64),
        role_index=np.array(role_index, np.int64),
        role_name=role_name,
        baseline_addr=np.array(baseline, np.int64),
    )
    return _names(codes), _names(baseline_codes)


def test_each_rule():
    events = [
        ("alloc", 0x10, "forward", None),  # 0 outlives the forward span: activation
        ("alloc", 0x20, "forward", None),  # 1 freed within it: temporary
        ("free_completed", 0x20, "forward", None),  # 2 as its alloc
        ("alloc", 0x30, "backward", None),  # 3 a gradient role at position 4
        ("free_completed", 0x10, "backward", None),  # 4 as its alloc
        ("alloc", 0x40, "optimizer", "kv_cache"),  # 5 a hint wins over the phase
        ("alloc", 0x50, None, None),  # 6 outside any phase: other
        ("alloc", 0x60, "eval", None),  # 7 a user phase, outlived: other
        ("alloc", 0x70, "forward", "all_gather"),  # 8 a role wins over a weak hint
        ("free_completed", 0x99, None, None),  # 9 releases a baseline block
        ("alloc", 0x80, "forward", "all_gather"),  # 10 a weak hint wins over the phase
    ]
    roles = [(0x30, 4, "gradient"), (0x70, 9, "parameter"), (0x99, 0, "optimizer_state")]
    codes, baseline = _classify(events, roles, baseline=[0x99, 0x88])
    assert codes == [
        "activation",
        "temporary",
        "temporary",
        "gradient",
        "activation",
        "kv_cache",
        "other",
        "other",
        "parameter",
        "optimizer_state",
        "all_gather",
    ]
    assert baseline == ["optimizer_state", "other"]


def test_roles_by_precedence():
    events = [("alloc", 0x10, "forward", None), ("alloc", 0x20, "forward", None)]
    roles = [(0x10, 2, "gradient"), (0x10, 2, "parameter"), (0x20, 2, "kv_cache"), (0x20, 2, "buffer")]
    assert _classify(events, roles)[0] == ["parameter", "parameter"]  # a buffer is module state


def test_a_role_after_its_baseline_block_was_freed_names_nothing():
    events = [("free_completed", 0x88, None, None), ("alloc", 0x10, None, None)]
    codes, baseline = _classify(events, [(0x88, 1, "parameter")], baseline=[0x88])
    assert baseline == ["other"] and codes == ["other", "other"]


def test_a_free_of_an_unknown_block_is_other():
    codes, _ = _classify([("free_requested", 0x10, "forward", None)])
    assert codes == ["other"]
    codes, _ = _classify([("segment_alloc", 0x10, None, None), ("oom", 0, None, None)])
    assert codes == [None, None]  # not block events: no category
