"""profiler.report: the report is built from parsed data, then rendered; the CLI only prints it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from profiler import report
from profiler.cli import main
from profiler.trace.reader import load_trace

REPO = Path(__file__).resolve().parents[2]
GOLDEN = json.loads((REPO / "tests" / "fixtures" / "report_json.json").read_text())
RUN = "traces/gpt2-small-bf16-h100"
JOB = "traces/h200x2-fsdp-gpt2-small/ablate-fsdp-baseline-20261122-101134-b96e91"


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch):
    monkeypatch.chdir(REPO)  # the recorded paths are relative to the checkout


def test_build_report_from_a_trace_is_the_recorded_report():
    facts = report.build_report(load_trace(RUN))
    assert json.loads(report.to_json(facts)) == GOLDEN[RUN]["report"]


def test_the_cli_prints_what_the_reporter_renders(capsys):
    facts = report.report_of(RUN, top=3)
    assert main(["report", RUN, "--top", "3"]) == 0
    assert capsys.readouterr().out == report.render(facts) + "\n"
    assert main(["report", RUN, "--top", "3", "--json"]) == 0
    assert capsys.readouterr().out == report.to_json(facts) + "\n"


def test_to_json_is_one_indented_object():
    facts = report.report_of(RUN)
    text = report.to_json(facts)
    assert text.startswith('{\n "run": {\n  "run_id"')
    assert json.loads(text) == facts


def test_render_needs_only_the_facts():
    facts = json.loads(report.to_json(report.report_of(RUN)))  # plain data, nothing loaded behind it
    text = report.render(facts)
    assert text.splitlines()[0] == f"vramscope report: {facts['run']['name']}  ({facts['run']['run_id']})"
    assert "Peak allocated" in text and "Categories at the peak" in text


def test_a_job_reports_its_ranks_then_its_largest_rank():
    facts = report.report_of(JOB)
    assert list(facts)[0] == "ranks"
    assert facts["ranks"]["world_size"] == 2
    assert facts["run"]["path"] == facts["ranks"]["largest_rank_path"]
    assert facts == GOLDEN[JOB]["report"]
    lines = report.render(facts).splitlines()
    assert lines[0].startswith(f"vramscope job: {JOB}   2 ranks")


def test_plain_makes_numpy_and_missing_values_json_ready():
    np = pytest.importorskip("numpy")
    pd = pytest.importorskip("pandas")
    value = {1: np.int64(7), "f": np.float64("nan"), "na": pd.NA, "t": (np.bool_(True), None)}
    assert report.plain(value) == {"1": 7, "f": None, "na": None, "t": [True, None]}


def test_text_table_aligns_numbers_right():
    lines = report.text_table(["name", "bytes"], [["a", "1"], ["bbb", "100"]], right={1})
    assert lines == ["  name  bytes", "  a         1", "  bbb     100"]


def test_importing_the_reporter_loads_no_capture_cli_or_pandas():
    # `import profiler` loads one capture module, import_hooks: standard library only, it
    # waits for inductor's import (the line maps of graphs compiled before a capture).
    code = (
        "import sys, profiler.report; "
        "print([m for m in sys.modules if m.startswith(('profiler.capture', 'profiler.cli', 'torch', "
        "'pandas')) and m not in ('profiler.capture', 'profiler.capture.import_hooks')])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]"
