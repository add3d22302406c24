"""AppTest smoke tests of every dashboard page on the bundled traces (copied, since reading runs
caches summary.json beside them), a folder with a corrupt run, a live run, and the Overview's
peak numbers against `vramscope report`."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

pytest.importorskip("plotly")
pytest.importorskip("streamlit")

from streamlit.testing.v1 import AppTest  # noqa: E402

from dashboard import data  # noqa: E402
from profiler.report import build_report  # noqa: E402
from profiler.trace.reader import load_trace  # noqa: E402
from profiler.units import exact_bytes, human_bytes  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
PAGES = REPO / "dashboard" / "pages"
TRACES = REPO / "traces"
GPT2 = "gpt2-small-bf16-h100"
SEEDS = TRACES / "h100-ablation-seeds"

# page: charts it draws on the bundled traces
EXPECTED_CHARTS = {
    "runs": 0,
    "overview": 3,
    "layers": 2,
    "categories": 2,
    "fragmentation": 2,
    "kv": 2,
    "compare": 3,
    "stacks": 2,
}


@pytest.fixture(scope="module")
def traces(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("traces")
    shutil.copytree(TRACES / GPT2, root / GPT2)
    for sub in ("h100-ablation-kv",):
        shutil.copytree(TRACES / sub, root / sub)
    seeds = root / "h100-ablation-seeds"
    seeds.mkdir()
    for run in sorted(SEEDS.glob("ablate-seeds-*"))[:3]:
        shutil.copytree(run, seeds / run.name)
    for table in SEEDS.glob("*.parquet"):
        shutil.copy(table, seeds / table.name)
    return root


def page(name: str, root: Path, monkeypatch, **state) -> AppTest:
    monkeypatch.setenv("VRAMSCOPE_TRACES", str(root))
    at = AppTest.from_file(str(PAGES / f"{name}.py"), default_timeout=60)
    for key, value in state.items():
        at.session_state[key] = value
    return at.run()


def _as_read(markdown: str) -> str:
    """A message as the page shows it: trace strings come backslash-escaped (dashboard/text.py)."""
    return re.sub(r"\\(.)", r"\1", markdown)


def _said(at: AppTest) -> list[str]:
    """The page's Markdown as it reads: trace-derived text is shown backslash-escaped (dashboard.text)."""
    return [re.sub(r"\\(.)", r"\1", m.value) for m in at.markdown]


def _ok(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


@pytest.mark.parametrize("name", list(EXPECTED_CHARTS))
def test_page_renders(name, traces, monkeypatch):
    at = page(name, traces, monkeypatch, current_run=str(traces / GPT2))
    _ok(at)
    assert len(at.get("plotly_chart")) == EXPECTED_CHARTS[name]
    assert at.dataframe


def test_runs_page_lists_every_run(traces, monkeypatch):
    at = page("runs", traces, monkeypatch)
    _ok(at)
    shown = at.dataframe[0].value
    assert len(shown) == 1 + 9 + 3
    assert "error" not in shown and "run" not in shown  # no run has one; no absolute path is shown
    table = data.runs_table(traces)
    row = table[table["name"] == GPT2].iloc[0]
    report = build_report(load_trace(traces / GPT2))
    assert row["peak_allocated_bytes"] == report["peak"]["allocated_bytes"]
    assert row["peak_reserved_bytes"] == report["peak"]["reserved_bytes"]
    assert row["model"] == "gpt2-small" and "precision=bf16" in row["toggles"]
    # shown in GiB, to the digit the unit allows
    gib = shown.loc[shown["name"] == GPT2, "peak_allocated_bytes"].iloc[0]
    assert gib == pytest.approx(report["peak"]["allocated_bytes"] / 2**30)


def test_app_wires_every_page(traces, monkeypatch):
    monkeypatch.setenv("VRAMSCOPE_TRACES", str(traces))
    at = AppTest.from_file(str(REPO / "dashboard" / "app.py"), default_timeout=60).run()
    _ok(at)
    assert at.title[0].value == "Runs"
    at.switch_page("pages/overview.py").run()
    _ok(at)
    assert at.title[0].value == "Overview"


def test_a_corrupt_run_is_a_row_with_its_error(tmp_path, monkeypatch):
    for run in sorted(SEEDS.glob("ablate-seeds-*"))[:2]:
        shutil.copytree(run, tmp_path / run.name)
    bad = tmp_path / "broken-run"
    shutil.copytree(TRACES / GPT2, bad)
    (bad / "events.parquet").write_bytes(b"PAR1 not parquet at all")
    (bad / "meta.json").write_text((TRACES / GPT2 / "meta.json").read_text())
    worse = tmp_path / "not-json"
    worse.mkdir()
    (worse / "meta.json").write_text("{nope")
    at = page("runs", tmp_path, monkeypatch)
    assert not at.exception
    table = data.runs_table(tmp_path)
    assert len(table) == 4 and len(at.dataframe[0].value) == 4
    errors = table[table["error"].notna()]
    assert sorted(errors["name"]) == ["broken-run", "not-json"]
    assert all("\n" not in e for e in errors["error"])
    assert len(at.warning) == 2
    assert table[table["error"].isna()]["peak_allocated_bytes"].notna().all()
    # The other pages still work on the readable runs.
    at = page("overview", tmp_path, monkeypatch)
    _ok(at)


def test_overview_peak_numbers_match_the_report(traces, monkeypatch):
    run = traces / GPT2
    at = page("overview", traces, monkeypatch, current_run=str(run))
    _ok(at)
    report = build_report(load_trace(run))
    shown = {m.label: (m.value, m.help) for m in at.metric}
    for label, exact in (
        ("Peak allocated", report["peak"]["allocated_bytes"]),
        ("Active then", report["peak"]["active_bytes"]),
        ("Peak reserved", report["peak"]["reserved_bytes"]),
        ("Allocator max", report["allocator"]["max_allocated_bytes"]),
    ):
        assert shown[label][0] == human_bytes(exact) and exact_bytes(exact) in shown[label][1], label
    headline = [m for m in _said(at) if m.startswith("**Peak ")]
    assert headline and f"Peak {human_bytes(report['peak']['allocated_bytes'])} allocated" in headline[0]
    assert at.slider(key="overview_moment").value == report["peak"]["event_index"]


def test_compare_takes_the_runs_pages_selection(traces, monkeypatch):
    runs = [str(r) for r in sorted((traces / "h100-ablation-seeds").glob("ablate-seeds-*"))]
    at = page("compare", traces, monkeypatch, compare_runs=runs)
    _ok(at)
    assert at.multiselect[0].value == runs
    table = at.dataframe[0].value
    assert len(table) == 3 and table["is_baseline"].sum() == 1
    assert {"memory_saved_pct", "speed_change_pct", "loss", "loss_delta"} <= set(table.columns)
    assert table["loss"].notna().all()
    assert at.success  # the loss check passes on these seeds
    at.toggle[0].set_value(False).run()
    assert len(at.dataframe[0].value.columns) > len(table.columns)


def test_live_page_follows_an_unfinished_run(traces, tmp_path, monkeypatch):
    empty = page("live", traces, monkeypatch)
    assert not empty.exception and empty.info
    run = tmp_path / "capturing"
    shutil.copytree(TRACES / GPT2, run)
    meta = json.loads((run / "meta.json").read_text())
    del meta["status"]
    # No final status, and its capture's process (this one) alive: a run being written.
    meta.update(pid=os.getpid(), hostname=socket.gethostname(), started_at=time.time())
    (run / "meta.json").write_text(json.dumps(meta))
    at = page("live", tmp_path, monkeypatch)
    _ok(at)
    assert len(at.get("plotly_chart")) == 1
    assert {m.label for m in at.metric} >= {"Events so far", "Peak allocated so far"}
    # Once its process is gone, there is nothing left to follow.
    (run / "meta.json").write_text(json.dumps(meta | {"pid": _ended_pid()}))
    gone = page("live", tmp_path, monkeypatch)
    assert not gone.exception and gone.info and not gone.get("plotly_chart")


def _ended_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_estimate_page_sets_measured_against_predicted(traces, monkeypatch):
    run = sorted((traces / "h100-ablation-seeds").glob("ablate-seeds-*"))[0]
    at = page("estimate", traces, monkeypatch, current_run=str(run))
    _ok(at)
    assert len(at.get("plotly_chart")) == 1
    table = at.dataframe[0].value
    from profiler.estimate import measured_vs_predicted

    expected = measured_vs_predicted(load_trace(run))
    want = expected[(expected["level"] == "category") & (expected["name"] == "peak")].iloc[0]
    assert want["measured_bytes"] == load_trace(run).meta["max_allocated_bytes"]
    peak = table[table["name"] == "peak"].iloc[0]  # shown in GiB
    assert peak["measured_bytes"] == pytest.approx(want["measured_bytes"] / 2**30)
    said = [m for m in _said(at) if "analytic model predicts" in m]
    assert (
        said
        and human_bytes(int(want["predicted_bytes"])) in said[0]
        and human_bytes(int(want["measured_bytes"])) in said[0]
    )


def test_estimate_page_says_when_a_run_is_not_understood(traces, monkeypatch):
    at = page("estimate", traces, monkeypatch, current_run=str(next((traces / "h100-ablation-kv").glob("ablate-kv-*"))))
    _ok(at)
    assert at.info


# -- multi-rank runs ----------------------------------------------------------------------------


def _jobs(root: Path) -> tuple[Path, Path, Path]:
    """A complete 2-rank job (rank 1 peaks higher), a 3-rank job whose rank 2 never wrote, a single run."""
    from rank_runs import write_job

    two = write_job(root, "job2", {0: 2000, 1: 6000}, name="two")
    three = write_job(root, "job3", {0: 1000, 1: 1500}, world_size=3, name="three")
    single = root / "single"
    shutil.move(write_job(root / "elsewhere", "single", {0: 500}, name="single") / "rank=0", single)
    shutil.rmtree(root / "elsewhere")
    return two, three, single


def test_ranks_page_shows_every_rank(tmp_path, monkeypatch):
    two, three, _ = _jobs(tmp_path)
    at = page("ranks", tmp_path, monkeypatch, current_job=str(two))
    _ok(at)
    assert len(at.get("plotly_chart")) == 3  # peaks, timelines, categories
    assert at.dataframe[0].value["rank"].tolist() == [0, 1]
    shown = {m.label: m.value for m in at.metric}
    assert shown["Per-GPU peak (rank 1)"] == human_bytes(7500) and shown["Smallest peak (rank 0)"] == human_bytes(3500)
    assert {m.label: m.help for m in at.metric}["Per-GPU peak (rank 1)"] == exact_bytes(7500)
    assert shown["Max against median"] == f"{(7500 - 5500) / 5500 * 100:+.2f}%"
    assert at.multiselect[0].value == [0, 1] and not at.warning
    at = page("ranks", tmp_path, monkeypatch, current_job=str(three))
    _ok(at)
    assert at.dataframe[0].value["status"].tolist() == ["complete", "complete", "missing"]
    assert len(at.warning) == 1 and "rank=2" in _as_read(at.warning[0].value)


def test_ranks_page_without_a_multi_rank_run(traces, monkeypatch):
    at = page("ranks", traces, monkeypatch)
    _ok(at)
    assert "No multi-rank run" in at.info[0].value and not at.get("plotly_chart")


def test_runs_page_shows_a_job_as_one_row(tmp_path, monkeypatch):
    two, three, single = _jobs(tmp_path)
    at = page("runs", tmp_path, monkeypatch)
    assert not at.exception
    assert len(at.dataframe[0].value) == 3
    table = data.runs_table(tmp_path).set_index("run")
    assert sorted(table.index) == sorted(map(str, (two, three, single)))
    assert table.loc[str(two), "world_size"] == 2 and table.loc[str(two), "peak_allocated_bytes"] == 7500
    assert table.loc[str(three), "world_size"] == 3 and table.loc[str(three), "failed_ranks"] == "2"
    assert pd.isna(table.loc[str(single), "world_size"])
    assert len(at.warning) == 1 and "three" in _as_read(at.warning[0].value)


def test_single_run_pages_show_one_rank_of_a_job(tmp_path, monkeypatch):
    two, _, _ = _jobs(tmp_path)
    at = page("overview", tmp_path, monkeypatch, current_run=str(two / "rank=0"))
    _ok(at)
    assert at.selectbox[0].value == str(two) and at.selectbox[1].value == str(two / "rank=0")
    assert {m.label: m.value for m in at.metric}["Peak allocated"] == human_bytes(3500)
    at = page("overview", tmp_path, monkeypatch, current_run=str(two))  # the job: its largest rank first
    _ok(at)
    assert at.selectbox[1].value == str(two / "rank=1")
    assert {m.label: m.value for m in at.metric}["Peak allocated"] == human_bytes(7500)


def test_compare_takes_runs_of_different_world_sizes(tmp_path, monkeypatch):
    runs = [str(r) for r in _jobs(tmp_path)]
    at = page("compare", tmp_path, monkeypatch, compare_runs=runs)
    _ok(at)
    table = at.dataframe[0].value
    assert table["world_size"].tolist() == [2, 3, 1]
    kib = [round(v * 1024) for v in table["peak_allocated_bytes"]]  # shown in KiB
    assert kib == [7500, 1000 + 1500 + 500, 1000 + 500 + 500]
    overlay = at.get("plotly_chart")[0].proto.spec
    assert "(rank 1 of 2)" in overlay and "(rank 1 of 3)" in overlay
    said = [m for m in _said(at) if "differ in kind" in m]  # the headline: no best option
    assert said and "world size" in said[0] and "Best option" not in said[0]


def test_the_dashboard_imports_no_cli_and_leaves_the_import_path_alone():
    import ast

    for source in sorted((REPO / "dashboard").rglob("*.py")):
        tree = ast.parse(source.read_text())
        imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {f"{n.module}.{a.name}" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
        assert not any(m == "profiler.cli" or m.startswith("profiler.cli.") for m in imported), source
        assert "sys" not in imported, source  # no page puts the repository on sys.path itself


def test_trace_strings_reach_the_page_as_text(tmp_path, monkeypatch):
    # A run folder whose name is Markdown: its one-line error quotes it in a warning.
    bad = tmp_path / "![pixel](https:evil.example) **loud**"
    bad.mkdir()
    (bad / "meta.json").write_text("{nope")
    at = page("runs", tmp_path, monkeypatch)
    assert not at.exception
    (warning,) = at.warning
    markdown_it = pytest.importorskip("markdown_it")
    html = markdown_it.MarkdownIt("commonmark").render(warning.value)
    assert "<img" not in html and "<strong" not in html and "<a " not in html
    assert bad.name in html  # shown as written
