"""The Fragmentation page's verdict and the Growth page, in AppTest, agree with `vramscope explain`
and `vramscope leaks` on the bundled traces (copied: reading runs caches summary.json beside them)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

pytest.importorskip("streamlit")

from streamlit.testing.v1 import AppTest  # noqa: E402

from profiler.analysis.explain import explain  # noqa: E402
from profiler.analysis.leaks import leaks  # noqa: E402
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
