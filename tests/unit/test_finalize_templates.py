"""finalize/templates.py: an unhooked step takes modules and phases from an identical hooked step."""

from __future__ import annotations

import numpy as np

from profiler.trace.finalize.templates import fill_from_templates

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


def _codes(step0: list[int]) -> np.ndarray:
    return np.array(step0 + [-1] * 7)


def test_a_repeated_step_is_filled_event_by_event():
    module, phase, hint = _codes([0, 1, 1]), _codes([0, 0, 1]), _codes([-1, 2, -1])
    counts = fill_from_templates(
        step=STEP, action=ACTION, size=SIZE, hooked_steps={0}, module=module, phase=phase, hint=hint
    )
    assert counts == {"steps_from_template": 1, "steps_without_template": 1}
    # Step 1's block events (3, 5, 6) are step 0's (0, 1, 2); its segment event and step 2 keep nothing.
    assert module.tolist() == [0, 1, 1, 0, -1, 1, 1, -1, -1, -1]
    assert phase.tolist() == [0, 0, 1, 0, -1, 0, 1, -1, -1, -1]
    assert hint.tolist() == [-1, 2, -1, -1, -1, 2, -1, -1, -1, -1]


def test_hooked_steps_are_left_as_they_are():
    module = np.arange(10)
    phase, hint = module.copy(), module.copy()
    counts = fill_from_templates(
        step=STEP, action=ACTION, size=SIZE, hooked_steps={0, 1, 2}, module=module, phase=phase, hint=hint
    )
    assert counts == {"steps_from_template": 0, "steps_without_template": 0}
    assert module.tolist() == list(range(10))


def test_events_in_any_order_group_by_step():
    order = np.array([3, 0, 4, 1, 5, 2, 6, 7, 8, 9])  # steps 0 and 1 interleaved in the arrays
    module = _codes([5, 6, 7])[order]
    fill_from_templates(
        step=STEP[order],
        action=ACTION[order],
        size=SIZE[order],
        hooked_steps={0},
        module=module,
        phase=np.zeros(10, np.int64),
        hint=np.zeros(10, np.int64),
    )
    filled = dict(zip(order.tolist(), module.tolist()))
    assert [filled[i] for i in (3, 4, 5, 6)] == [5, -1, 6, 7]
