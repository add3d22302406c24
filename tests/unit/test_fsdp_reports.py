"""The FSDPMemTracker comparisons measured on two H200s (traces/h200x2-fsdp-checks/),
re-evaluated here from their raw figures: every held row within 5%."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from workloads.fsdp_check import MOMENTS, TOLERANCE_PCT, evaluate

REPORTS = sorted((Path(__file__).resolve().parents[2] / "traces" / "h200x2-fsdp-checks").glob("*.json"))


@pytest.mark.parametrize("path", REPORTS, ids=[p.stem for p in REPORTS])
def test_measured_report_holds(path):
    report = json.loads(path.read_text())
    assert report["device"] == "cuda" and len(report["ranks"]) == 2
    assert evaluate(report)
    for rank in report["ranks"]:
        assert set(rank["tables"]) == set(MOMENTS)
        for rows in rank["tables"].values():
            for r in rows:
                if r["held"]:
                    assert abs(r["diff_pct"]) <= TOLERANCE_PCT, r


def test_the_reports_cover_every_fsdp_category_that_lives_on_the_gpu():
    assert len(REPORTS) == 7
    held = set()
    for path in REPORTS:
        report = json.loads(path.read_text())
        evaluate(report)
        held |= {
            r["category"]
            for rank in report["ranks"]
            for rows in rank["tables"].values()
            for r in rows
            if r["held"] and r["vramscope"] > 0
        }
    assert {
        "parameter",
        "unsharded_parameter",
        "all_gather",
        "gradient",
        "optimizer_state",
        "activation",
        "total without other",
    } <= held
