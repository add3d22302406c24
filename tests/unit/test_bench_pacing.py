"""bench/pacing.py runs the session's drain rules on a clock: each step end is judged once, and
the drains it reports are the ones DrainPacing and the timer asked for."""

from __future__ import annotations

from bench import pacing


def test_every_step_is_covered_by_one_drain_at_most_and_no_drain_passes_its_share():
    run = pacing.schedule(0.0034, 0.0015, 0.000018, 2000, 0.5, 0.005)
    assert run["covered_first"][0] == 1  # the first step end drains
    assert run["covered_first"][:4] == [1, 6, 9, 18]  # the probe, 1.5x until a fit, then the fit
    # 1.5 ms fixed + FLOOR (0.1) of a step beyond it: 1.84 ms, 0.54 of a 3.4 ms step
    assert abs(run["largest_drain_share_of_a_step"] - (0.0015 + 19 * 0.000018) / 0.0034) < 1e-9
    # drain time a token: each drain's cost, over the steps
    assert 80 < run["drain_us_a_token"] < 110


def test_a_timer_drain_runs_where_pacing_would_wait_longer():
    run = pacing.schedule(0.010, 0.0015, 0.000043, 300, 0.5, 0.005)
    assert run["timed"] > 0 and run["covered_last"] <= 52  # 0.5 s of 10 ms steps, and the drains' time


def test_bad_arguments_exit_2(capsys):
    assert pacing.main(["--tokens", "0"]) == 2
    assert pacing.main(["--step-ms", "-1"]) == 2
    assert pacing.main(["--step-ms", "x"]) == 2
    assert "pacing.py" in capsys.readouterr().out
