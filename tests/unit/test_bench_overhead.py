"""bench/overhead.py's arithmetic and its per-row JSON, without a GPU."""

from __future__ import annotations

import json
import statistics

import pytest

from bench import overhead


def test_ratios_leave_each_rounds_first_step_apart():
    plain = [[9.0, 1.0, 1.0, 2.0], [9.0, 1.0, 1.0, 1.0]]
    captured = [[20.0, 1.0, 1.0, 4.0], [30.0, 1.0, 2.0, 1.0]]
    r = overhead.ratios(plain, captured)
    assert r["median_ratio"] == 1.0
    assert r["mean_ratio"] == pytest.approx(statistics.mean([1, 1, 4, 1, 2, 1]) / statistics.mean([1, 1, 2, 1, 1, 1]))
    assert r["worst_step_ratio"] == 4.0 and r["first_step_ratio"] == 30.0
    with pytest.raises(ValueError):
        overhead.ratios([[1.0]], [[1.0]])


def test_each_rounds_mean_is_set_against_the_plain_round_before_it():
    plain = [[9.0, 1.0, 1.0], [9.0, 2.0, 2.0]]
    captured = [[20.0, 1.5, 1.5], [30.0, 2.0, 4.0]]
    assert overhead.per_round_mean_ratios(plain, captured) == [1.5, 1.5]


def test_hooked_steps_are_told_apart_by_the_traces_steps_and_their_part_of_the_mean_ratio():
    plain = [[9.0, 1.0, 1.0, 1.0, 1.0]]
    captured = [[9.0, 3.0, 1.0, 1.0, 1.0]]
    # decode and generate: a round's i-th time is step i + 1 (the prefill's step is not timed)
    got = overhead.hooked_split(plain, captured, [{"hooked_steps": [0, 2]}], first_step=1)
    assert (got["hooked_steps"], got["unhooked_steps"]) == (1, 3)
    assert got["hooked_mean_ms"] == 3000.0 and got["unhooked_mean_ms"] == 1000.0
    assert got["hooked_part_of_mean_ratio"] == pytest.approx((3.0 - 1.0) / 4 / 1.0)
    # training: the i-th time is step i; step 2 (a plain 1.0) is the hooked one
    assert overhead.hooked_split(plain, captured, [{"hooked_steps": [2]}], first_step=0)[
        "hooked_part_of_mean_ratio"
    ] == (pytest.approx((1.0 - 5.0 / 3) / 4))
    assert overhead.hooked_split(plain, captured, [{"hooked_steps": None}], first_step=1) is None


def test_summary_takes_the_worse_decode_and_the_worst_step():
    results = {
        "rows": {
            "train": dict(mean_ratio=1.02, worst_step_ratio=1.3, runs=[{"capture_path": "native"}]),
            "decode_prealloc": dict(mean_ratio=1.05, worst_step_ratio=1.1),
            "decode_concat": dict(mean_ratio=1.08, worst_step_ratio=1.9),
            "compiled": dict(status="failed", error="x"),
        }
    }
    s = overhead.summary(results)
    assert s["train_full_capture_mean_ratio"] == 1.02
    assert s["decode_full_capture_mean_ratio"] == 1.08
    assert s["worst_step_ratio"] == 1.9
    assert s["train_compiled_mean_ratio"] is None and s["generate_mean_ratio"] is None
    assert s["capture_path"] == ["native"]


def test_a_row_that_cannot_run_is_recorded_and_the_json_written(tmp_path, monkeypatch):
    monkeypatch.setattr(overhead.torch.cuda, "is_available", lambda: False)
    path = tmp_path / "o.json"
    assert overhead.main(["--rows", "train", "cpu", "--json", str(path)]) == 0
    got = json.loads(path.read_text())
    assert got["rows"]["train"] == {**got["rows"]["train"], "status": "not run", "error": "no CUDA device"}
    assert "status" in got["rows"]["cpu"] or "mean_ratio" in got["rows"]["cpu"]


def test_bad_arguments_exit_2(capsys):
    assert overhead.main(["--steps", "1"]) == 2
    with pytest.raises(SystemExit) as e:
        overhead.main(["--rows", "nope"])
    assert e.value.code == 2


def test_a_runs_facts_name_the_steps_that_ran_module_hooks(tmp_path):
    import torch

    import profiler
    from bench import overhead_rows

    model = torch.nn.Linear(4, 4)
    with profiler.profile(out=tmp_path, name="t", backend="cpu", hooked_steps=(2, 4)) as prof:
        for _ in range(6):
            model(torch.randn(2, 4))
            prof.step()
    facts = overhead_rows._run_facts(prof)
    assert facts["hooked_steps"] == [0, 1, 4]  # the first two, then every 4th
    assert facts["steps_from_template"] == 3  # the unhooked steps 2, 3 and 5
    assert overhead_rows._hooked_steps(tmp_path / "absent") is None
