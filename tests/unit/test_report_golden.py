"""Every bundled trace reads the same as when report_json.json was recorded.

The fixture holds `vramscope report RUN --json` for each run and job under traces/,
recorded before the trace stage moved into profiler/trace/; a refactor that changes
any number, key or order shows up here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from profiler.cli import main

REPO = Path(__file__).resolve().parents[2]
GOLDEN = json.loads((REPO / "tests" / "fixtures" / "report_json.json").read_text())


@pytest.mark.parametrize("run", sorted(GOLDEN))
def test_bundled_trace_reports_as_recorded(run, capsys, monkeypatch):
    monkeypatch.chdir(REPO)  # the recorded paths are relative to the checkout
    rc = main(["report", run, "--json"])
    assert rc == GOLDEN[run]["rc"]
    assert json.loads(capsys.readouterr().out) == GOLDEN[run]["report"]


def test_golden_covers_every_bundled_run():
    runs = {
        str(p.parent.relative_to(REPO))
        for p in (REPO / "traces").rglob("meta.json")
        if not p.parent.name.startswith("rank=")
    }
    jobs = {str(p.parent.relative_to(REPO)) for p in (REPO / "traces").rglob("rank=0")}
    assert runs | jobs == set(GOLDEN), "record new bundled runs in tests/fixtures/report_json.json"
