"""finalize/templates.py: an unhooked step takes modules and phases from a hooked step, event by
event: identical, same allocation sites with other sizes, or aligned around a few events that differ."""

from __future__ import annotations

import numpy as np

from profiler.trace.finalize.alignment import align, unambiguous
from profiler.trace.finalize.templates import fill_from_templates, phase_runs

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


def _fill(step, action, size, stack, hooked, module, phase, hint=None, kept=None, skip=None, addr=None):
    n = len(step)
    return fill_from_templates(
        step=np.asarray(step),
        action=np.asarray(action, dtype=object),
        size=np.asarray(size),
        stack=np.asarray(stack),
        addr=np.arange(n) if addr is None else np.asarray(addr),
        hooked_steps=hooked,
        module=module,
        phase=phase,
        hint=np.full(n, -1) if hint is None else hint,
        phase_kept=np.zeros(n, bool) if kept is None else kept,
        skip=skip,
    )


def test_a_repeated_step_is_filled_event_by_event():
    module, phase, hint = _codes([0, 1, 1]), _codes([0, 0, 1]), _codes([-1, 2, -1])
    addr = [1, 2, 1, 3, 0, 4, 3, 5, 6, 5]  # each step frees its first block
    fill = _fill(STEP, ACTION, SIZE, NO_STACK, {0}, module, phase, hint, addr=addr)
    # Step 2 differs in a size only; without stacks its sites are its actions, the same as step 0's.
    assert fill.counts() == {
        "steps_from_template": 2,
        "steps_without_template": 0,
        "steps_aligned_to_template": 1,
        "events_without_template": 1,
        "template_steps": [1, 2],
    }
    assert fill.filled_steps == {1, 2}
    # Step 1's block events (3, 5, 6) are step 0's (0, 1, 2); its segment event takes the
    # phase of the events around it, and no module. Step 2's 2048-byte block outlives its step
    # and has no stack: nothing shows it is step 0's 1024-byte one, so it takes no label.
    assert module.tolist() == [0, 1, 1, 0, -1, 1, 1, 0, -1, 1]
    assert phase.tolist() == [0, 0, 1, 0, 0, 0, 1, 0, -1, 1]
    assert hint.tolist() == [-1, 2, -1, -1, -1, 2, -1, -1, -1, -1]


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


F, B = 0, 1  # phase codes


def _training_step(scale=1, layers=3, skip_layer=None):
    """A hand-built training step as CUDA records it: forward allocations with stacks (site 1 the
    input, sites 3 and 5 once per layer: the same sites for another module), then backward
    allocations without stacks (a gradient that outlives the step, an input gradient, a
    temporary) and frees that carry their allocation's stack. Rows are
    (action, size, stack, module, phase, block)."""
    rows = [("alloc", 100 * scale, 1, 10, F, "x")]
    run = [lyr for lyr in range(layers) if lyr != skip_layer]
    for lyr in run:
        m = 20 + lyr
        rows += [("alloc", 300 * scale, 3, m, F, f"h{lyr}"), ("alloc", 200 * scale, 5, m, F, f"t{lyr}")]
        rows += [("free_completed", 200 * scale, 5, m, F, f"t{lyr}")]
    above = None  # the input gradient of the layer above, freed once this layer's is made
    for lyr in reversed(run):
        m = 20 + lyr
        rows += [("alloc", 64, -1, m, B, f"g{lyr}"), ("alloc", 300 * scale, -1, m, B, f"d{lyr}")]
        rows += [("free_completed", 300 * scale, 3, m, B, f"h{lyr}"), ("alloc", 40 * scale, -1, m, B, f"w{lyr}")]
        rows += [("free_completed", 40 * scale, -1, m, B, f"w{lyr}")]
        if above is not None:
            rows.append(("free_completed", 300 * scale, -1, m, B, f"d{above}"))
        above = lyr
    rows.append(("free_completed", 300 * scale, -1, 20 + run[0], B, f"d{above}"))
    return rows


def _two_steps(unhooked_rows):
    """Step 0 hooked (labels known), step 1 the given rows (labels unknown: no module, and the
    backward phase the capture records without hooks). Returns the arrays and step 1's truth."""
    hooked = _training_step()
    rows = hooked + unhooked_rows
    step = np.r_[np.zeros(len(hooked), int), np.ones(len(unhooked_rows), int)]
    action, size, stack, module, phase, block = (np.array(c, dtype=object) for c in zip(*rows))
    addr = np.array([hash((int(s), b)) % (1 << 40) for s, b in zip(step, block)])
    truth = module[step == 1].astype(np.int64), phase[step == 1].astype(np.int64)
    module = np.where(step == 0, module, -1).astype(np.int64)
    phase = np.where((step == 0) | (phase == B), phase, -1).astype(np.int64)
    return dict(step=step, action=action, size=size.astype(np.int64), stack=stack.astype(np.int64), addr=addr), (
        module,
        phase,
        truth,
    )


def _fill_two(unhooked_rows):
    cols, (module, phase, truth) = _two_steps(unhooked_rows)
    fill = _fill(cols["step"], cols["action"], cols["size"], cols["stack"], {0}, module, phase, addr=cols["addr"])
    one = cols["step"] == 1
    return fill, module[one], phase[one], truth


def _never_wrong(got, truth):
    """Every label is the truth or none."""
    wrong = (got >= 0) & (got != truth)
    assert not wrong.any(), [(int(i), int(got[i]), int(truth[i])) for i in np.flatnonzero(wrong)]


def test_a_longer_batch_takes_its_template_by_position():
    fill, module, phase, (truth_module, truth_phase) = _fill_two(_training_step(scale=4))
    assert fill.counts()["steps_aligned_to_template"] == 1 and fill.counts()["events_without_template"] == 0
    assert module.tolist() == truth_module.tolist()
    assert phase.tolist() == truth_phase.tolist()


def test_a_one_off_without_a_stack_takes_no_neighbours_label():
    """A workspace made on the first matmul of backward's thread: no stack, never freed."""
    rows = _training_step(scale=4)
    at = next(i for i, r in enumerate(rows) if r[5] == "d1") + 1
    rows.insert(at, ("alloc", 32 << 20, -1, 21, B, "workspace"))
    fill, module, phase, (truth_module, truth_phase) = _fill_two(rows)
    _never_wrong(module, truth_module)
    _never_wrong(phase, truth_phase)
    # No site, no certain pair: the workspace stays unnamed, and so do the allocations without
    # a stack between the anchors around it (any of them could be the extra one); the rest keep
    # their names.
    assert module[at] == -1 and (module >= 0).mean() > 0.6


def test_a_one_off_temporary_among_repeating_events_takes_no_label():
    """An allocation freed at once, without a stack, in a stretch of such pairs: every event
    around it could be aligned one place on, so none of them takes a label from a neighbour."""
    rows = _training_step(scale=2)
    at = next(i for i, r in enumerate(rows) if r[5] == "w1")
    rows[at:at] = [("alloc", 40 * 2, -1, 21, B, "extra"), ("free_completed", 40 * 2, -1, 21, B, "extra")]
    _, module, phase, (truth_module, truth_phase) = _fill_two(rows)
    _never_wrong(module, truth_module)
    _never_wrong(phase, truth_phase)


def test_a_skipped_layer_never_names_another_layer():
    """Layer 1 did not run (a layer drop): layer 2's events have the keys layer 1's had."""
    _, module, phase, (truth_module, truth_phase) = _fill_two(_training_step(scale=2, skip_layer=1))
    _never_wrong(module, truth_module)
    _never_wrong(phase, truth_phase)


def test_an_unpaired_event_takes_the_one_label_its_site_had():
    """A second input (site 1, always module 10 when hooked) and an extra allocation at site 3
    (modules 20, 21 and 22 when hooked): the first is named, the second stays unnamed."""
    rows = _training_step(scale=3)
    rows[1:1] = [("alloc", 7, 1, 10, F, "x2")]
    rows.insert(3, ("alloc", 9, 3, 20, F, "extra"))
    _, module, _, (truth_module, _) = _fill_two(rows)
    assert module[1] == 10 and module[3] == -1
    _never_wrong(module, truth_module)


def test_mutated_steps_never_get_a_wrong_label():
    """One-offs (with and without stacks, kept or freed), missing temporaries, skipped layers
    and longer batches, at random: each label of the unhooked step is right or absent."""
    rng = np.random.default_rng(0)
    labelled = 0
    for _ in range(1000):
        rows = _training_step(scale=int(rng.choice([1, 2, 4])), skip_layer=rng.choice([None, 0, 1, 2]))
        for k in range(int(rng.integers(0, 4))):
            stack = int(rng.choice([-1, 1, 3, 5]))
            size = int(rng.choice([64, 40, 300, 32 << 20]))
            if stack < 0:  # without a stack: backward's thread, anywhere
                at = int(rng.integers(1, len(rows)))
                module, phase = rows[at - 1][3], rows[at - 1][4]
            else:  # a forward line: in the forward, in the module whose code it is
                at = int(rng.integers(1, 1 + sum(r[4] == F for r in rows)))
                module, phase = (10 if stack == 1 or at == 1 else rows[at - 1][3]), F
            new = [("alloc", size, stack, module, phase, f"one-off{k}")]
            if rng.random() < 0.5:
                new.append(("free_completed", size, stack, module, phase, f"one-off{k}"))
            rows[at:at] = new
        if rng.random() < 0.3:
            gone = {r[5] for r in rows if r[5].startswith("w")}.pop()
            rows = [r for r in rows if r[5] != gone]
        _, module, phase, (truth_module, truth_phase) = _fill_two(rows)
        _never_wrong(module, truth_module)
        _never_wrong(phase, truth_phase)
        labelled += int((module >= 0).sum())
    assert labelled > 1000 * 3  # and labels are not all gone


def test_a_step_that_pairs_less_than_half_keeps_its_own_labels():
    rows = [(a, s, 40 + i, m, p, b) for i, (a, s, _, m, p, b) in enumerate(_training_step())]
    fill, module, _, _ = _fill_two([("alloc", *r[1:]) for r in rows])  # other sites, and no key in common
    assert fill.counts()["steps_without_template"] == 1
    assert (module == -1).all()


def test_kept_phases_and_markers_stay():
    cols, (module, phase, _) = _two_steps(_training_step(scale=3))
    first = int(np.flatnonzero(cols["step"] == 1)[0])
    last = len(phase) - 1
    phase[last] = 7  # e.g. optimizer: its own phase holds without hooks
    marker = first + 2
    module[marker], phase[marker] = 42, 9  # a marker is neither paired nor relabelled
    kept = (phase == 7) | (phase == 9)
    skip = np.arange(len(phase)) == marker
    _fill(
        cols["step"],
        cols["action"],
        cols["size"],
        cols["stack"],
        {0},
        module,
        phase,
        kept=kept,
        skip=skip,
        addr=cols["addr"],
    )
    assert phase[last] == 7 and module[last] == 20  # the module still comes from the template
    assert (phase[marker], module[marker]) == (9, 42)


def test_align_pairs_heads_tails_and_equal_stretches_only():
    a = np.array([1, 2, 3, 9, 4, 5, 6])
    b = np.array([1, 2, 3, 4, 5, 8, 6])
    ia, ib = align(a, b)
    assert list(zip(ia.tolist(), ib.tolist())) == [(0, 0), (1, 1), (2, 2), (4, 3), (5, 4), (6, 6)]
    # Inside a stretch that differs on both sides nothing pairs.
    ia, ib = align(np.array([1, 7, 7, 2]), np.array([1, 7, 9, 7, 2]))
    assert list(zip(ia.tolist(), ib.tolist())) == [(0, 0), (1, 1), (2, 3), (3, 4)]


def test_unambiguous_drops_pairs_a_gap_could_slide_over():
    head, tail = np.arange(10, 20), np.arange(20, 30)
    # One 7 inserted into a run of 7s: it could be any of the three, so no 7 pairs.
    ia, ib = unambiguous(np.r_[head, 7, 7, 7, tail], np.r_[head, 7, 7, tail])
    assert ia[0] == 0 and ib[-1] == 21 and not np.isin([10, 11, 12], ia).any()
    # A period (3, 5) missing from three: either of the two left could be any of the three.
    ia, ib = unambiguous(np.r_[head, 3, 5, 3, 5, tail], np.r_[head, 3, 5, 3, 5, 3, 5, tail])
    assert ia[0] == 0 and ib[-1] == 25 and not np.isin(np.arange(10, 14), ia).any()


def test_phase_runs_skip_events_not_considered():
    step = np.array([1, 1, 1, 1, 1, 2])
    ts = np.arange(6) * 10
    phase = np.array([0, -1, 0, 1, 1, 0])
    got = phase_runs(step, ts, phase, emit=phase >= 0, considered=phase >= 0, steps={1})
    assert [x.tolist() for x in got] == [[1, 1], [0, 1], [0, 30], [20, 40]]
