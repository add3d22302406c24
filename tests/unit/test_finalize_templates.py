"""finalize/templates.py: an unhooked step takes modules and phases from a hooked step, event by
event: identical, same allocation sites with other sizes, or aligned around a few events that differ."""

from __future__ import annotations

import numpy as np

from profiler.trace.finalize.templates import align, by_occurrence, fill_from_templates, phase_runs

# Codes into each part's values; -1 is none. Step 0 is hooked; step 1 repeats it exactly (with a
# segment event, which is not a block event and takes no part); step 2 differs in one size.
STEP = np.array([0, 0, 0, 1, 1, 1, 1, 2, 2, 2])
ACTION = np.array(
    [
        "alloc",
        "alloc",
        "free_completed",
        "alloc",
        "segment_alloc",
        "alloc",
        "free_completed",
        "alloc",
        "alloc",
        "free_completed",
    ],
    dtype=object,
)
SIZE = np.array([512, 1024, 512, 512, 2 << 20, 1024, 512, 512, 2048, 512])
NO_STACK = np.full(10, -1)


def _codes(step0: list[int]) -> np.ndarray:
    return np.array(step0 + [-1] * 7)


def _fill(step, action, size, stack, hooked, module, phase, hint=None, kept=None, skip=None):
    n = len(step)
    return fill_from_templates(
        step=np.asarray(step),
        action=np.asarray(action, dtype=object),
        size=np.asarray(size),
        stack=np.asarray(stack),
        hooked_steps=hooked,
        module=module,
        phase=phase,
        hint=np.full(n, -1) if hint is None else hint,
        phase_kept=np.zeros(n, bool) if kept is None else kept,
        skip=skip,
    )


def test_a_repeated_step_is_filled_event_by_event():
    module, phase, hint = _codes([0, 1, 1]), _codes([0, 0, 1]), _codes([-1, 2, -1])
    fill = _fill(STEP, ACTION, SIZE, NO_STACK, {0}, module, phase, hint)
    # Step 2 differs in a size only; without stacks its sites are its actions, the same as step 0's.
    assert fill.counts() == {
        "steps_from_template": 2,
        "steps_without_template": 0,
        "steps_aligned_to_template": 1,
        "events_without_template": 0,
    }
    assert fill.filled_steps == {1, 2}
    # Step 1's block events (3, 5, 6) are step 0's (0, 1, 2); its segment event takes the
    # phase of the event before it, and no module.
    assert module.tolist() == [0, 1, 1, 0, -1, 1, 1, 0, 1, 1]
    assert phase.tolist() == [0, 0, 1, 0, 0, 0, 1, 0, 0, 1]
    assert hint.tolist() == [-1, 2, -1, -1, -1, 2, -1, -1, 2, -1]


def test_different_stacks_are_different_sites():
    stack = np.array([5, 6, 5, 5, -1, 6, 5, 7, 8, 9])  # step 2 ran other code
    module, phase = _codes([0, 1, 1]), _codes([0, 0, 1])
    fill = _fill(STEP, ACTION, SIZE, stack, {0}, module, phase)
    assert fill.counts()["steps_without_template"] == 1 and fill.filled_steps == {1}
    assert module[7:].tolist() == [-1, -1, -1] and phase[7:].tolist() == [-1, -1, -1]


def test_hooked_steps_are_left_as_they_are():
    module = np.arange(10)
    phase, hint = module.copy(), module.copy()
    fill = _fill(STEP, ACTION, SIZE, NO_STACK, {0, 1, 2}, module, phase, hint)
    assert fill.counts()["steps_from_template"] == 0 and fill.counts()["steps_without_template"] == 0
    assert module.tolist() == list(range(10))


def test_events_in_any_order_group_by_step():
    order = np.array([3, 0, 4, 1, 5, 2, 6, 7, 8, 9])  # steps 0 and 1 interleaved in the arrays
    module = _codes([5, 6, 7])[order]
    _fill(STEP[order], ACTION[order], SIZE[order], NO_STACK, {0}, module, np.zeros(10, np.int64))
    filled = dict(zip(order.tolist(), module.tolist()))
    assert [filled[i] for i in (3, 4, 5, 6)] == [5, -1, 6, 7]


def _training_step(sizes_scale=1, extra_at=None):
    """A hand-built step: forward allocs at sites 1, 3 and 5 (3 and 5 once per layer, the
    same sites for another module), then stackless backward allocs and frees.
    Returns (action, size, stack, module, phase)."""
    rows = [
        ("alloc", 100, 1, 10, 0),
        ("alloc", 300, 3, 11, 0),  # layer 0
        ("alloc", 200, 5, 12, 0),
        ("alloc", 300, 3, 13, 0),  # layer 1: the same sites, other modules
        ("alloc", 200, 5, 14, 0),
        ("alloc", 50, -1, 13, 1),  # backward: no stacks
        ("free_completed", 300, -1, 13, 1),
        ("alloc", 60, -1, 12, 1),
        ("free_completed", 300, -1, 12, 1),
        ("alloc", 70, -1, 11, 1),
    ]
    if extra_at is not None:  # e.g. a DataLoader batch rebuilt in the middle of the step
        rows.insert(extra_at, ("alloc", 8, 99, -1, -1))
    action, size, stack, module, phase = (np.array(c) for c in zip(*rows))
    return action.astype(object), size * sizes_scale, stack, module, phase


def _two_steps(unhooked):
    """Step 0 hooked (labels known), step 1 as given (labels unknown: -1, backward stays 1)."""
    a0, s0, k0, m0, p0 = _training_step()
    a1, s1, k1, m1, p1 = unhooked
    step = np.r_[np.zeros(len(a0), int), np.ones(len(a1), int)]
    truth = m1.copy()
    raw_phase = np.where(p1 == 1, 1, -1)
    module = np.r_[m0, np.full(len(a1), -1)]
    phase = np.r_[p0, raw_phase]
    return step, np.r_[a0, a1], np.r_[s0, s1], np.r_[k0, k1], module, phase, truth


def test_a_longer_batch_takes_its_template_by_position():
    step, action, size, stack, module, phase, truth = _two_steps(_training_step(sizes_scale=4))
    fill = _fill(step, action, size, stack, {0}, module, phase)
    assert fill.counts()["steps_aligned_to_template"] == 1
    assert module[step == 1].tolist() == truth.tolist()
    assert phase[step == 1].tolist() == [0] * 5 + [1] * 5


def test_an_inserted_event_is_aligned_around():
    step, action, size, stack, module, phase, truth = _two_steps(_training_step(sizes_scale=4, extra_at=2))
    fill = _fill(step, action, size, stack, {0}, module, phase)
    counts = fill.counts()
    assert counts["steps_aligned_to_template"] == 1 and counts["events_without_template"] == 1
    got = module[step == 1]
    # Every event but the inserted one has its module; the inserted one has none, and takes
    # the phase of the event before it.
    assert got.tolist() == truth.tolist()
    assert phase[step == 1].tolist() == [0] * 6 + [1] * 5


def test_a_missing_event_leaves_the_rest_paired():
    a, s, k, m, p = _training_step(sizes_scale=2)
    keep = np.arange(len(a)) != 2  # layer 0's site-5 alloc is gone; layer 1's must still be layer 1
    step, action, size, stack, module, phase, truth = _two_steps((a[keep], s[keep], k[keep], m[keep], p[keep]))
    _fill(step, action, size, stack, {0}, module, phase)
    assert module[step == 1].tolist() == truth.tolist()


def test_a_step_that_pairs_less_than_half_keeps_its_own_labels():
    a, s, _, m, p = _training_step()
    other = (a, s, np.arange(20, 30), m, p)  # every site differs; without stacks the frees would pair
    step, action, size, stack, module, phase, _ = _two_steps(other)
    action[step == 1] = "alloc"  # no key in common at all
    fill = _fill(step, action, size, stack, {0}, module, phase)
    assert fill.counts()["steps_without_template"] == 1
    assert (module[step == 1] == -1).all()


def test_kept_phases_and_markers_stay():
    step, action, size, stack, module, phase, _ = _two_steps(_training_step(sizes_scale=3, extra_at=3))
    # A marker (phase 9, module 42) just before step 1's unpaired extra event.
    at = int(np.flatnonzero(step == 1)[0]) + 3
    step, action, size, stack, module, phase = (
        np.insert(a, at, v)
        for a, v in ((step, 1), (action, "alloc"), (size, 512), (stack, -1), (module, 42), (phase, 9))
    )
    last = len(step) - 1
    phase[last] = 7  # e.g. optimizer: its own phase holds without hooks
    kept = (phase == 7) | (phase == 9)
    _fill(step, action, size, stack, {0}, module, phase, kept=kept, skip=np.arange(len(step)) == at)
    assert phase[last] == 7 and module[last] == 11  # the module still comes from the template
    assert (phase[at], module[at]) == (9, 42)  # the marker is neither paired nor relabelled
    assert (phase[at + 1], module[at + 1]) == (0, -1)  # the unpaired event: the forward before it


def test_align_pairs_heads_tails_and_differing_stretches():
    a = np.array([1, 2, 3, 9, 4, 5, 6])
    b = np.array([1, 2, 3, 4, 5, 8, 6])
    ia, ib = align(a, b)
    assert list(zip(ia.tolist(), ib.tolist())) == [(0, 0), (1, 1), (2, 2), (4, 3), (5, 4), (6, 6)]
    # A stretch that differs on both sides pairs by key occurrence inside it.
    ia, ib = align(np.array([1, 7, 7, 2]), np.array([1, 7, 9, 7, 2]))
    assert list(zip(ia.tolist(), ib.tolist())) == [(0, 0), (1, 1), (2, 3), (3, 4)]


def test_by_occurrence_pairs_the_kth_with_the_kth():
    ia, ib = by_occurrence(np.array([5, 6, 5, 5]), np.array([6, 5, 5]))
    assert list(zip(ia.tolist(), ib.tolist())) == [(0, 1), (1, 0), (2, 2)]


def test_phase_runs_skip_events_not_considered():
    step = np.array([1, 1, 1, 1, 1, 2])
    ts = np.arange(6) * 10
    phase = np.array([0, -1, 0, 1, 1, 0])
    got = phase_runs(step, ts, phase, emit=phase >= 0, considered=phase >= 0, steps={1})
    assert [x.tolist() for x in got] == [[1, 1], [0, 1], [0, 30], [20, 40]]
