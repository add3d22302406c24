"""The Fragmentation page's verdict and the Growth page, in AppTest, agree with `vramscope explain`
and `vramscope leaks` on the bundled traces (copied: reading runs caches summary.json beside them)."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("streamlit")

from streamlit.testing.v1 import AppTest  # noqa: E402

from profiler.analysis.explain import explain  # noqa: E402
from profiler.analysis.fragmentation import segment_map_at  # noqa: E402
from profiler.analysis.leaks import leaks  # noqa: E402
from profiler.analysis.slack import segment_slack, slack_by_step, slack_verdict  # noqa: E402
from profiler.trace.reader import load_trace  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
BASELINE = next((REPO / "traces" / "h100-ablation-seeds").glob("ablate-seeds-baseline-*"))


@pytest.fixture(scope="module")
def traces(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("traces")
    shutil.copytree(BASELINE, root / BASELINE.name)
    return root


def _page(name: str, root: Path, monkeypatch) -> AppTest:
    monkeypatch.setenv("VRAMSCOPE_TRACES", str(root))
    at = AppTest.from_file(str(REPO / "dashboard" / "pages" / f"{name}.py"), default_timeout=90)
    at.session_state["current_run"] = str(root / BASELINE.name)
    at = at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    return at


def test_the_fragmentation_page_leads_with_the_explanation(traces, monkeypatch):
    at = _page("fragmentation", traces, monkeypatch)
    e = explain(load_trace(traces / BASELINE.name))
    assert at.markdown[0].value == e.verdict
    parts = at.dataframe[0].value
    assert [int(v.replace(",", "")) for v in parts["exact bytes"]] == list(e.parts.values())
    assert any("expandable_segments:True" in m.value for m in at.markdown)


def test_the_growth_page_says_what_leaks_says(traces, monkeypatch):
    at = _page("leaks", traces, monkeypatch)
    g = leaks(load_trace(traces / BASELINE.name))
    assert at.title[0].value == "Growth"
    assert at.markdown[0].value == g.verdict == "Nothing keeps growing over 6 step ends."


CHARTS = ("slack_panels", "segment_map")  # the page's charts, in the order it draws them


def _spec(at: AppTest, name: str) -> dict:
    return json.loads(at.get("plotly_chart")[CHARTS.index(name)].proto.spec)


def _values(array) -> list:
    """A trace's array as the page sent it: plotly writes numeric arrays as typed base64."""
    if isinstance(array, dict):
        flat = np.frombuffer(base64.b64decode(array["bdata"]), dtype=array["dtype"])
        return flat.reshape([int(n) for n in array.get("shape", "-1").split(",")]).tolist()
    return list(array)


def test_the_slack_at_every_step_end_agrees_with_the_counters(traces, monkeypatch):
    at = _page("fragmentation", traces, monkeypatch)
    trace = load_trace(traces / BASELINE.name)
    by_step = slack_by_step(trace)
    verdict = slack_verdict(by_step)
    assert verdict.sentence in [m.value for m in at.markdown] and verdict.matters == "cached_free_bytes"
    steps = trace.steps.sort_values("step")
    panels = {t["name"]: t for t in _spec(at, "slack_panels")["data"]}
    assert list(panels) == ["cached but free", "inactive split", "largest free block", "allocator retries"]
    assert all(_values(t["x"]) == steps["step"].tolist() for t in panels.values())  # every step end: 7 points
    cached = steps["reserved_bytes"] - steps["active_bytes"]
    assert _values(panels["cached but free"]["customdata"]) == cached.tolist()
    assert _values(panels["inactive split"]["customdata"]) == steps["inactive_split_bytes"].tolist()
    assert _values(panels["allocator retries"]["y"]) == steps["num_alloc_retries"].tolist()
    assert not [c for c in at.caption if "not recorded" in c.value]


def test_the_segment_map_shows_the_segments_holding_the_free_bytes_at_the_judged_step(traces, monkeypatch):
    at = _page("fragmentation", traces, monkeypatch)
    trace = load_trace(traces / BASELINE.name)
    verdict = slack_verdict(slack_by_step(trace))
    assert at.selectbox(key="frag_at").value.startswith(f"end of step {verdict.step} ")

    def drawn(at: AppTest) -> tuple[set, int]:
        bars = [t for t in _spec(at, "segment_map")["data"] if t["name"] == "inactive"]
        free = sum(int(row[1]) for t in bars for row in _values(t["customdata"]))  # every free block shown
        return {y for t in _spec(at, "segment_map")["data"] for y in _values(t["y"])}, free

    segments, free = drawn(at)
    layout = segment_map_at(trace, verdict.at_step["event_index"])
    # The verdict names the cached-but-free bytes: the 10 segments holding the most free bytes are drawn.
    by_free = segment_slack(layout, "free_bytes")
    assert len(segments) == 10 and free == int(by_free["free_bytes"].head(10).sum())
    at.toggle(key="frag_all_segments").set_value(True).run()
    assert not at.exception
    segments, free = drawn(at)
    assert len(segments) == layout["segment_addr"].nunique()
    # All of the map's free bytes are the counters' reserved - active; the split among them is theirs too.
    ranked = segment_slack(layout)
    assert free == int(ranked["free_bytes"].sum()) == verdict.at_step["cached_free_bytes"]
    assert int(ranked["inactive_split_bytes"].sum()) == verdict.at_step["inactive_split_bytes"]


def test_a_quantity_not_recorded_per_step_is_one_line_not_a_panel(tmp_path, monkeypatch):
    # The hand-built CUDA run, its steps table without inactive split or retries (an older capture's).
    from analysis_runs import SEG, cuda_run_with_steps

    counted = ((0, 5632, 3 * SEG, 6144), (1, 3584, 2 * SEG, 3584))  # step, allocated, reserved, active at its end
    steps = [dict(step=s, allocated_bytes=a, reserved_bytes=r, active_bytes=act) for s, a, r, act in counted]
    run = cuda_run_with_steps(tmp_path / "traces", steps)
    monkeypatch.setenv("VRAMSCOPE_TRACES", str(tmp_path / "traces"))
    at = AppTest.from_file(str(REPO / "dashboard" / "pages" / "fragmentation.py"), default_timeout=90)
    at.session_state["current_run"] = str(run)
    at = at.run()
    assert not at.exception, [e.value for e in at.exception]
    lines = [c.value for c in at.caption if "not recorded" in c.value]
    assert lines == [
        "Inactive split: not recorded at the step ends of this run, so not drawn.",
        "Allocator retries: not recorded at the step ends of this run, so not drawn.",
    ]
    panels = _spec(at, "slack_panels")["data"]
    assert [t["name"] for t in panels] == ["cached but free", "largest free block"]
    assert _values(panels[0]["customdata"]) == [3 * SEG - 6144, 2 * SEG - 3584]
    assert _values(panels[1]["customdata"]) == [SEG, SEG - 1536]
