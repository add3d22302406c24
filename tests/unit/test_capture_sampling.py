"""capture/sampling.py: which steps run module hooks, fed with hand-built drained columns; and
capture/frames.py: stacks leave vramscope's own frames out, so hooks do not change a stack."""

from __future__ import annotations

import os

import pyarrow as pa
import pytest

from profiler.capture.frames import OWN_DIR, StackInterner
from profiler.capture.options import CaptureOptions
from profiler.capture.sampling import HookSampling
from profiler.trace.finalize.markers import marker_tag

SITES = [("alloc", 1), ("alloc", 2), ("free_requested", 1), ("free_completed", 1)]


def _cols(step: int, sites=SITES, tags=None) -> dict:
    n = len(sites)
    return {
        "action": [a for a, _ in sites],
        "stack_id": [s for _, s in sites],
        "step": [step] * n,
        "tag": tags or [""] * n,
    }


def _cpu(hooked_steps=(2, 0)) -> HookSampling:
    return HookSampling(CaptureOptions(hooked_steps=hooked_steps), steps_exact=True)


def _run(sampling: HookSampling, steps: list, peaks=None) -> list[bool]:
    """Drive a capture as the session does on CPU: decide, drain, end; returns hooks per step."""
    hooked = []
    for s, sites in enumerate(steps):
        on = sampling.hooks(s)
        hooked.append(on)
        sampling.observe(_cols(s, sites))
        sampling.step_ended(s, on, None if peaks is None else peaks[s])
    return hooked


def test_a_new_unhooked_step_hooks_the_next_once():
    other = SITES + [("alloc", 9)]
    # Steps 0-1 hooked (first=2); 3 is new and unhooked: 4 is hooked; 6 is like 3: no more.
    steps = [SITES, SITES, SITES, other, other, SITES, other, other]
    assert _run(_cpu(), steps) == [True, True, False, False, True, False, False, False]


def test_sizes_aside_a_longer_batch_is_no_new_step_but_a_new_peak_hooks_the_next():
    peaks = [100, 100, 100, 100, 400, 400, 400]
    assert _run(_cpu(), [SITES] * 7, peaks) == [True, True, False, False, False, True, False]


def test_a_peak_that_creeps_up_hooks_once_per_growth_step_not_every_step():
    """A KV cache growing by a token per decode step raises the peak at every step."""
    peaks = [1000 + 3 * s for s in range(40)] + [2000] * 3  # +0.3% a step, then a jump
    hooked = _run(_cpu((1, 0)), [SITES] * len(peaks), peaks)
    # Step 17 passes 1000 by 5% (1051), step 35 passes 1051 by 5% (1105); step 40 jumps.
    assert [s for s, on in enumerate(hooked) if on] == [0, 18, 36, 41]


def test_a_hooked_new_step_is_a_template_not_a_reason():
    other = SITES + [("alloc", 9)]
    assert _run(_cpu((1, 0)), [SITES, other, SITES]) == [True, False, True]  # 1 was new, unhooked
    assert _run(_cpu((2, 0)), [SITES, other, other, SITES]) == [True, True, False, False]


def test_every_step_or_none():
    assert _run(_cpu(None), [SITES] * 3) == [True] * 3
    never = HookSampling(CaptureOptions(modules=False), steps_exact=True)
    assert _run(never, [SITES, SITES + [("alloc", 5)], SITES]) == [False] * 3


def _as_native_drain(cols: dict) -> dict:
    """The columns as the native CUDA backend drains them: Arrow dictionary arrays, null stacks."""
    return dict(
        cols,
        action=pa.array(cols["action"]).dictionary_encode(),
        tag=pa.array(cols["tag"]).dictionary_encode(),
        stack_id=pa.array(cols["stack_id"], pa.int32()),
    )


def _with_sites(cols: dict) -> dict:
    """The native backends' drain: Arrow columns, and `sites` as the tracker works them out."""
    import numpy as np

    from profiler.capture import native
    from profiler.trace.finalize.markers import PREFIX, parse_marker

    tracker, error = native.load(cuda=False)
    if tracker is None:
        pytest.skip(f"no native tracker here: {error}")
    codes = {"alloc": 0, "free_requested": 1, "free_completed": 2, "segment_alloc": 3}
    labels = list(dict.fromkeys(cols["tag"]))
    marker_steps = [
        parsed[1] if (parsed := parse_marker(t)) is not None else -2 if t.startswith(PREFIX) else -1 for t in labels
    ]
    got = tracker.drain_codes(
        np.array([labels.index(t) for t in cols["tag"]], np.int32),
        np.array([-1 if s is None else s for s in cols["stack_id"]], np.int32),
        np.array([codes[a] for a in cols["action"]], np.int8),
        np.arange(100, dtype=np.int32),  # tracker stack id s is interner stack id s
        np.array(marker_steps, np.int64),
        len(labels),
        True,
        9,
    )
    sites = dict(keys=got["site_keys"], starts=got["site_starts"], steps=got["site_steps"], last_step=got["last_step"])
    return dict(_as_native_drain(cols), sites=sites)


_DRAINED = {"lists": lambda cols: cols, "arrow": _as_native_drain, "sites": _with_sites}


@pytest.mark.parametrize("columns", sorted(_DRAINED))
def test_steps_from_markers_are_judged_once_their_successor_is_drained(columns):
    """CUDA: events carry the drain's step; each step begins at a marker tagged with it. The
    python path drains lists, the native path Arrow arrays: both are read the same way."""
    sampling = HookSampling(CaptureOptions(hooked_steps=(1, 0)), steps_exact=False)
    marker = [("alloc", None), ("free_completed", None)]
    assert sampling.hooks(0)
    sampling.step_ended(0, True, None)
    assert not sampling.hooks(1)
    sampling.step_ended(1, False, None)  # step 1 ran other code, not drained yet
    assert not sampling.hooks(2)
    # One drain holds step 0, step 1 (new: an extra site) and the start of step 2.
    sites = SITES + marker + SITES + [("alloc", 9)] + marker + SITES[:1]
    tags = [""] * 4 + [marker_tag(1, 1)] * 2 + [""] * 5 + [marker_tag(2, 2)] * 2 + [""]
    cols = _cols(2, sites, tags)
    sampling.observe(_DRAINED[columns](cols))
    sampling.step_ended(2, False, None)
    assert not sampling._failed
    assert sampling.hooks(3)


@pytest.mark.parametrize("columns", sorted(_DRAINED))
def test_a_drain_judged_in_slices_is_judged_as_a_whole(columns, monkeypatch):
    """A big drain is read in slices (its temporaries stay small): a step's sites that a
    slice boundary cuts, and markers at a slice's edge, give the same decisions."""
    from profiler.capture import sampling as sampling_module

    marker = [("alloc", None), ("free_completed", None)]
    other = SITES + [("alloc", 9)]
    sites, tags = [], []
    for step, kind in enumerate([SITES, SITES, other, SITES, other, SITES, SITES, other]):
        sites += kind + marker
        tags += [""] * len(kind) + [marker_tag(step + 1, step + 1)] * 2

    def decisions(slice_size, drained=columns):
        monkeypatch.setattr(sampling_module, "OBSERVE_SLICE", slice_size)
        sampling = HookSampling(CaptureOptions(hooked_steps=(1, 0)), steps_exact=False)
        for step in range(8):  # the steps end, unhooked but the first, before one drain takes them
            sampling.step_ended(step, step == 0, None)
        cols = _cols(0, sites, tags)
        sampling.observe(_DRAINED[drained](cols))
        assert not sampling._failed
        return sampling.hooks(9), sorted(sampling._seen), sampling._complete_through

    whole = decisions(10_000)
    assert whole[0] and len(whole[1]) == 2  # two kinds of step, one new and unhooked: a hook
    for size in (1, 3, 7):
        assert decisions(size) == whole
    assert whole == decisions(10_000, "lists")  # the same site sequences, however they were drained


def test_a_bug_turns_adaptive_hooking_off_and_never_raises():
    sampling = _cpu()
    sampling.observe({"action": ["alloc"], "stack_id": [1]})  # no step column: our bug, not the user's
    sampling.step_ended(0, False, 5)
    sampling.step_ended(1, False, 10)  # a new peak, but the rule is off now
    assert not sampling.hooks(3)


def test_stacks_leave_vramscope_frames_out():
    interner = StackInterner()
    user = {"filename": "/home/me/train.py", "line": 3, "name": "main"}
    ours = {"filename": os.path.join(OWN_DIR, "capture", "modules.py"), "line": 90, "name": "_call_impl"}
    torch_frame = {"filename": "/site-packages/torch/nn/modules/module.py", "line": 1778, "name": "_call_impl"}
    hooked = interner.stack_of_frames([torch_frame, ours, user])
    assert hooked == interner.stack_of_frames([torch_frame, user])
    assert interner.stack_of_frames([ours]) is None


def test_steps_split_across_drains_give_the_same_sites_however_drained():
    """A step whose events two drains share (a drain ends mid-step): the native sites carry
    on the step the drain before ended in, as the Arrow and list readings do."""
    import random

    rng = random.Random(3)
    marker = [("alloc", None), ("free_completed", None)]
    sites, tags = [], []
    for step in range(12):
        kind = SITES + [("alloc", rng.choice([7, 8, 9]))] * rng.randint(0, 2)
        sites += kind + marker
        tags += [""] * len(kind) + [marker_tag(step + 1, step + 1)] * 2
    cuts = sorted(rng.sample(range(1, len(sites)), 5))

    def seen(drained):
        sampling = HookSampling(CaptureOptions(hooked_steps=(1, 0)), steps_exact=False)
        for step in range(12):
            sampling.step_ended(step, step == 0, None)
        for start, end in zip([0, *cuts], [*cuts, len(sites)]):
            sampling.observe(_DRAINED[drained](_cols(0, sites[start:end], tags[start:end])))
        assert not sampling._failed
        return sorted(sampling._seen), sampling._complete_through, sampling.hooks(13)

    assert seen("sites") == seen("lists") == seen("arrow")
