"""diff_runs and `vramscope diff`: the hand-built CPU runs of analysis_runs.py, cpu_smaller keeping 1,000 B
less in l2 (its activation of 3,000 B is 2,000 B), so every delta is known by hand."""

from __future__ import annotations

import json

import pytest
from analysis_runs import cpu, cpu_smaller  # noqa: F401

from profiler.analysis.compare import compare, compare_categories, compare_modules, compare_phases, diff_runs
from profiler.analysis.summary import run_summary
from profiler.cli import main
from profiler.report_diff import diff_facts, render_diff


def test_phases_are_aligned_by_step_and_phase(cpu, cpu_smaller):  # noqa: F811
    phases = compare_phases(cpu, cpu_smaller)
    assert phases[["step", "phase", "a_peak_bytes", "b_peak_bytes", "delta_bytes"]].values.tolist() == [
        [0, "forward", 14_000, 13_000, -1000],  # event 4: l2's activation is made
        [0, "backward", 14_500, 13_500, -1000],  # event 5: the peak
        [0, "optimizer", 11_200, 11_200, 0],
    ]
    assert phases["a_has_peak"].tolist() == [False, True, False] == phases["b_has_peak"].tolist()


def test_diff_runs_holds_the_compare_page_numbers(cpu, cpu_smaller):  # noqa: F811
    d = diff_runs(cpu, cpu_smaller)
    assert d.metrics.equals(compare(run_summary(cpu), run_summary(cpu_smaller)))
    assert d.categories.equals(compare_categories(cpu, cpu_smaller))
    assert d.modules.equals(compare_modules(cpu, cpu_smaller))
    m = d.metrics.set_index("metric")
    assert m.loc["peak_allocated_bytes", ["a", "b", "delta"]].tolist() == [14_500, 13_500, -1000]


def test_facts_and_text(cpu, cpu_smaller):  # noqa: F811
    f = diff_facts(diff_runs(cpu, cpu_smaller), ("A", "B"), top=1)
    assert json.loads(json.dumps(f)) == f
    assert (f["a"]["peak_step"], f["a"]["peak_phase"], f["b"]["peak_phase"]) == (0, "backward", "backward")
    assert [(c["category"], c["delta_bytes"]) for c in f["categories_at_peak"]][0] == ("activation", -1000)
    assert [(m["module"], m["a_bytes"], m["b_bytes"]) for m in f["modules_at_peak"]] == [("l2", 3500, 2500)]
    text = "\n".join(render_diff(f))
    assert "peak_allocated_bytes" in text and "14,500 B" in text and "-1000 B" in text
    assert "* 14.16 KiB" in text  # the span holding a's peak is marked


def test_cli_diff_json_and_errors(cpu, cpu_smaller, capsys):  # noqa: F811
    assert main(["diff", str(cpu.path), str(cpu_smaller.path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["metrics"][0] == {
        "metric": "peak_allocated_bytes",
        "a": 14_500,
        "b": 13_500,
        "delta": -1000,
        "delta_pct": pytest.approx(-1000 / 14_500 * 100),
    }
    assert main(["diff", str(cpu.path)]) == 2
    assert main(["diff", str(cpu.path), str(cpu.path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 2 and all(ln.startswith("vramscope: error:") for ln in err.splitlines())
