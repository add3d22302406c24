"""One Profiler entered again: each capture starts from nothing and writes a run of its own."""

from __future__ import annotations

import pytest
import torch

import profiler
from profiler.capture import session
from profiler.trace.reader import load_trace
from workloads.model import preset
from workloads.train import build, make_batch, train_step

STEPS = 3
BACKENDS = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")),
]


def _summary(trace) -> dict:
    roles = trace.roles
    return dict(
        steps=sorted(int(s) for s in trace.steps["step"]),
        steps_completed=trace.meta["steps_completed"],
        phases=[(int(s), str(p)) for s, p in zip(trace.phases["step"], trace.phases["phase"])],
        roles={r: int((roles["role"] == r).sum()) for r in ("parameter", "gradient", "optimizer_state")},
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_profiler_entered_twice_writes_two_separate_runs(tmp_path, backend):
    torch.manual_seed(0)
    cfg = preset("tiny")
    model, opt = build(cfg, device=backend)
    prof = profiler.profile(out=tmp_path, name="again", backend=backend)
    run_dirs = []
    for _ in range(2):
        with prof:
            for _ in range(STEPS):
                train_step(model, opt, make_batch(cfg, device=backend))
            prof.mark("eval")  # a phase still open when the capture ends
        run_dirs.append(prof.run_dir)
    assert session.active() is None
    assert run_dirs[0] != run_dirs[1] and sorted(tmp_path.iterdir()) == sorted(run_dirs)
    first, second = (load_trace(d) for d in run_dirs)
    assert first.status == second.status == "complete"
    a, b = _summary(first), _summary(second)
    assert a["steps"][0] == b["steps"][0] == 0
    assert a["steps_completed"] == b["steps_completed"] == STEPS
    assert len(a["steps"]) == len(b["steps"])
    # No phase of the first capture leaks into the second: it starts with step 0's forward.
    assert b["phases"][0] == (0, "forward") and b["phases"][-1] == (STEPS, "eval")
    assert [p for _, p in a["phases"]] == [p for _, p in b["phases"]]
    # Names, parameters and optimizer states are registered again in the second run.
    assert a["roles"] == b["roles"] and b["roles"]["optimizer_state"] > 0
    assert set(second.modules["module"]) == set(first.modules["module"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_explicit_steps_of_one_capture_do_not_carry_into_the_next(tmp_path, backend):
    torch.manual_seed(0)
    cfg = preset("tiny")
    model, opt = build(cfg, device=backend)
    prof = profiler.profile(out=tmp_path, name="modes", backend=backend)
    with prof:
        prof.step()  # from here on, only prof.step() ends a step
        for _ in range(2):
            train_step(model, opt, make_batch(cfg, device=backend))
            train_step(model, opt, make_batch(cfg, device=backend))
            prof.step()
    explicit = load_trace(prof.run_dir)
    with prof:
        for _ in range(STEPS):
            train_step(model, opt, make_batch(cfg, device=backend))  # optimizer steps end steps again
    auto = load_trace(prof.run_dir)
    assert explicit.meta["steps_completed"] == 3  # an empty step, then two of two optimizer steps
    assert auto.meta["steps_completed"] == STEPS
    assert int((auto.phases["phase"] == "optimizer").sum()) == STEPS
    assert sorted(set(int(s) for s in auto.phases["step"])) == list(range(STEPS))


def test_entering_a_profiler_that_is_already_active_leaves_it_running(tmp_path):
    prof = profiler.profile(out=tmp_path, name="nested", backend="cpu")
    with prof:
        x = torch.ones(8)
        with pytest.raises(RuntimeError, match="already active"):
            prof.__enter__()
        assert session.active() is prof
        y = x * 2
        del x, y
    assert session.active() is None
    assert load_trace(prof.run_dir).status == "complete"
