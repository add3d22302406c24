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
