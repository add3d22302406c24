"""One definition of "memory saved %" and "speed change %", shared by compare, ablate and the dashboard."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from profiler.analysis.compare import Headline, compare, compare_summaries, headline, memory_saved_pct, speed_change_pct
from profiler.analysis.summary import tokens_per_second
from workloads import ablate


def test_memory_saved_is_the_share_of_the_baseline_peak():
    assert memory_saved_pct(1000, 750) == pytest.approx(25.0)
    assert memory_saved_pct(1000, 1500) == pytest.approx(-50.0)  # more memory: negative
    assert memory_saved_pct(1000, 1000) == 0.0


@pytest.mark.parametrize("base, run", [(None, 10), (10, None), (0, 10), (math.nan, 10), (10, pd.NA), ("x", 10)])
def test_memory_saved_needs_both_peaks_and_a_nonzero_baseline(base, run):
    assert memory_saved_pct(base, run) is None


def test_speed_change_is_throughput_gained():
    assert speed_change_pct(100, 80) == pytest.approx(25.0)  # 100 / 80 - 1: positive = faster
    assert speed_change_pct(100, 200) == pytest.approx(-50.0)  # twice the time: half the speed
    assert speed_change_pct(100, 50) == pytest.approx(100.0)  # twice as fast, not "50% of the time saved"


def test_speed_change_prefers_tokens_per_second_when_both_runs_have_it():
    # Four times the tokens per step in twice the time is twice as fast, not half.
    assert speed_change_pct(100, 200, 1000.0, 4 * 1000.0 / 2) == pytest.approx(100.0)
    assert speed_change_pct(100, 200, 1000.0, None) == pytest.approx(-50.0)  # one side only: step times
    assert speed_change_pct(None, 200, None, 2000.0) is None
    assert speed_change_pct(0, 200) is None and speed_change_pct(100, 0) is None


def test_tokens_and_step_times_agree_when_steps_hold_as_many_tokens():
    config = {"tokens_per_step": 8192}
    base, run = tokens_per_second(config, 100_000.0), tokens_per_second(config, 80_000.0)
    assert speed_change_pct(100_000.0, 80_000.0, base, run) == pytest.approx(speed_change_pct(100_000.0, 80_000.0))


def test_headline_of_two_summaries():
    base = {"peak_allocated_bytes": 1000, "median_step_time_us": 100.0, "tokens_per_s": None}
    run = {"peak_allocated_bytes": 750, "median_step_time_us": 80.0, "tokens_per_s": None}
    h = headline(base, run)
    assert h == Headline(memory_saved_pct=pytest.approx(25.0), speed_change_pct=pytest.approx(25.0))
    assert list(h.as_dict()) == ["memory_saved_pct", "speed_change_pct"]
    assert headline({}, run) == Headline(None, None)


def _summary(name, peak, step_us, tokens_per_s=None) -> dict:
    return {
        "run_id": name,
        "name": name,
        "peak_allocated_bytes": peak,
        "median_step_time_us": step_us,
        "tokens_per_s": tokens_per_s,
    }


@pytest.mark.parametrize("base_tokens, run_tokens", [(None, None), (1000.0, 2000.0), (1000.0, None)])
def test_compare_and_ablate_give_the_same_headline(base_tokens, run_tokens):
    summaries = [_summary("base", 1000, 100_000.0, base_tokens), _summary("run", 750, 200_000.0, run_tokens)]
    rows = [
        {
            "status": "ok",
            "peak_allocated_bytes": s["peak_allocated_bytes"],
            "median_step_ms": s["median_step_time_us"] / 1000,
            "tokens_per_s": s["tokens_per_s"],
        }
        for s in summaries
    ]
    table = compare_summaries(summaries, baseline=0)
    diffs = ablate.baseline_diffs(rows[1], rows[0])
    expected = headline(*summaries)
    for key in ("memory_saved_pct", "speed_change_pct"):
        assert table[key].iloc[1] == pytest.approx(diffs[key]) == pytest.approx(getattr(expected, key))
    table = compare(*summaries).set_index("metric")
    assert table.loc["memory_saved_pct", "delta_pct"] == pytest.approx(expected.memory_saved_pct)
    assert table.loc["speed_change_pct", "delta_pct"] == pytest.approx(expected.speed_change_pct)
