"""Multi-rank runs (profiler.trace.layout's views of a job, profiler/analysis/ranks.py and the dashboard's
runs table): per-rank peaks, skew, categories and timelines against hand-made ranks whose numbers are
worked out by hand (rank_runs.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from fakes import replay_peak
from rank_runs import GRAD, PARAM, peak_of, rank_events, step_us, write_job, write_rank

from profiler.analysis import ranks
from profiler.analysis.compare import compare_summaries
from profiler.errors import TraceError
from profiler.trace import layout
from profiler.trace.summary_cache import load_summary

ACT = {0: 2000, 1: 6000}  # rank 1 holds the larger activation: peaks 3500 and 7500
PEAKS = {r: peak_of(a) for r, a in ACT.items()}


@pytest.fixture
def two_ranks(tmp_path) -> Path:
    return write_job(tmp_path, "job2", ACT)


@pytest.fixture
def four_ranks_two_failed(tmp_path) -> Path:
    """world_size 4: ranks 0 and 1 complete, rank 2 killed (journals only), rank 3 never wrote."""
    return write_job(tmp_path, "job4", {0: 2000, 1: 6000, 2: 3000}, world_size=4, statuses={2: None})


def test_layout_helpers(tmp_path, two_ranks):
    for rank in (2, 10, 9):  # natural order: rank=10 after rank=9
        write_rank(tmp_path, "job2", rank, 1000, 11)
    assert [p.name for p in layout.rank_dirs(two_ranks)] == ["rank=0", "rank=1", "rank=2", "rank=9", "rank=10"]
    assert layout.is_multi_rank(two_ranks) and layout.is_multi_rank(two_ranks / "rank=1")
    assert layout.run_root_of(two_ranks / "rank=1") == two_ranks == layout.run_root_of(two_ranks)
    single = write_job(tmp_path, "single", {0: 1}) / "rank=0"
    shutil.move(single, tmp_path / "plain")
    assert not layout.is_multi_rank(tmp_path / "plain") and layout.rank_dirs(tmp_path / "plain") == []


def test_rank_table_peaks_are_the_allocators_and_the_replays(two_ranks):
    table = layout.rank_table(two_ranks)
    assert table["rank"].tolist() == [0, 1]
    for row in table.itertuples():
        meta = json.loads((two_ranks / f"rank={row.rank}" / "meta.json").read_text())
        assert row.peak_allocated_bytes == meta["max_allocated_bytes"] == PEAKS[row.rank]
        assert row.replayed_peak_bytes == replay_peak(rank_events(ACT[row.rank])) == PEAKS[row.rank]
        assert row.replayed_peak_bytes == load_summary(two_ranks / f"rank={row.rank}")["peak_allocated_bytes"]
        assert row.peak_reserved_bytes == meta["max_reserved_bytes"] == 4 * PEAKS[row.rank]
        assert row.median_step_time_us == step_us(row.rank)
        assert (row.world_size, row.status, row.steps, row.events) == (2, "complete", 2, 13)
        assert row.hostname == meta["hostname"] and pd.isna(row.error)


def test_skew_by_hand(two_ranks):
    table = layout.rank_table(two_ranks)
    skew = ranks.rank_skew(table)
    median = (3500 + 7500) / 2
    assert skew == dict(
        max_bytes=7500,
        max_rank=1,
        min_bytes=3500,
        min_rank=0,
        median_bytes=median,
        max_min_ratio=pytest.approx(7500 / 3500),
        spread_bytes=4000,
        skew_pct=pytest.approx((7500 - median) / median * 100),
        ranks=2,
    )
    assert table["is_max"].tolist() == [False, True]
    np.testing.assert_allclose(table["skew_pct"], [(3500 - median) / median * 100, (7500 - median) / median * 100])


def test_a_killed_and_a_missing_rank_are_rows_that_say_so(four_ranks_two_failed):
    table = layout.rank_table(four_ranks_two_failed)
    assert table["rank"].tolist() == [0, 1, 2, 3]
    assert table["status"].tolist() == ["complete", "complete", "running", "missing"]
    assert table["error"].iloc[:2].isna().all()
    assert "journals only" in table["error"][2] and "rank=3" in table["error"][3]
    # The killed rank has no allocator maximum: its peak is the replay of its journals.
    assert table["peak_allocated_bytes"].tolist()[:3] == [3500, 7500, 4500]
    assert pd.isna(table["peak_allocated_bytes"][3]) and (table["world_size"] == 4).all()
    skew = ranks.rank_skew(table)
    assert (skew["ranks"], skew["median_bytes"], skew["max_rank"], skew["min_rank"]) == (3, 4500, 1, 0)
    assert skew["skew_pct"] == pytest.approx((7500 - 4500) / 4500 * 100)
    assert table["is_max"].tolist() == [False, True, False, False]


def test_categories_per_rank_sum_to_each_ranks_peak(four_ranks_two_failed):
    cats = layout.rank_categories(four_ranks_two_failed)
    assert cats["rank"].tolist() == [0, 1, 2]  # the missing rank has nothing to split
    split = cats.drop(columns=["rank", "peak_allocated_bytes"])
    assert (split.sum(axis=1) == cats["peak_allocated_bytes"]).all()
    assert cats["peak_allocated_bytes"].tolist() == [3500, 7500, 4500]
    assert (cats["parameter"] == PARAM).all() and (cats["gradient"] == GRAD).all()
    assert layout.rank_categories(four_ranks_two_failed, ranks=[1])["rank"].tolist() == [1]


def test_timelines_reach_each_peak_and_line_up_by_step(four_ranks_two_failed):
    tl = layout.rank_timelines(four_ranks_two_failed)
    assert list(tl.columns) == list(ranks.TIMELINE_COLUMNS)
    assert tl.groupby("rank")["allocated_bytes"].max().to_dict() == {0: 3500, 1: 7500, 2: 4500}
    for _, g in tl.groupby("rank"):
        assert g["ts_s"].iloc[0] == 0 and (np.diff(g["x"]) >= 0).all()
        assert g["x"].min() == 0 and 1 <= g["x"].max() <= 2 and set(g["step"]) == {0, 1}
    # One rank's line is the single-run timeline's, downsampled without losing its peak.
    small = layout.rank_timelines(four_ranks_two_failed, ranks=[1], max_points=4)
    assert small["rank"].unique().tolist() == [1] and small["allocated_bytes"].max() == 7500


def test_group_summary_is_per_gpu(four_ranks_two_failed):
    s = layout.run_group_summary(four_ranks_two_failed)
    rank1 = load_summary(four_ranks_two_failed / "rank=1")
    assert s["peak_allocated_bytes"] == s["allocator_max_allocated_bytes"] == 7500 == max(PEAKS.values())
    assert s["categories_at_peak_bytes"] == rank1["categories_at_peak_bytes"]
    assert sum(s["categories_at_peak_bytes"].values()) == 7500
    assert (s["world_size"], s["ranks_readable"], s["failed_ranks"], s["peak_rank"]) == (4, 3, [2, 3], 1)
    assert s["status"] == "incomplete" and s["run_id"] == "job4" and s["name"] == "job"
    assert s["config"]["world_size"] == 4 and s["config"]["parallel"] == "fsdp"
    assert s["median_step_time_us"] == step_us(2)  # the slowest rank's
    assert s["steps"] == 2 and s["events"] == 3 * 13
    assert s["peak_skew_pct"] == pytest.approx((7500 - 4500) / 4500 * 100)
    json.dumps(s, allow_nan=False)  # a summary like any other: JSON-ready


def test_group_summaries_compare_across_world_sizes(tmp_path, two_ranks):
    three = write_job(tmp_path, "job3", {0: 1000, 1: 1500, 2: 500})
    table = compare_summaries([layout.run_group_summary(two_ranks), layout.run_group_summary(three)])
    assert table["world_size"].tolist() == [2, 3]
    assert table["peak_allocated_bytes"].tolist() == [7500, peak_of(1500)]
    assert table["memory_saved_pct"].iloc[1] == pytest.approx((7500 - peak_of(1500)) / 7500 * 100)


def test_a_corrupt_rank_gives_its_error_and_never_raises(tmp_path):
    job = write_job(tmp_path, "bad", {0: 2000, 1: 6000, 2: 3000, 3: 1000})
    (job / "rank=1" / "events.parquet").write_bytes(b"PAR1 not parquet at all")
    (job / "rank=2" / "meta.json").write_text("{nope")
    shutil.rmtree(job / "rank=3")
    (job / "rank=3").mkdir()  # a partition with nothing in it
    table = layout.rank_table(job)
    assert table["status"].tolist() == ["complete", "unreadable", "unreadable", "unreadable"]
    assert "events.parquet" in table["error"][1] and "meta.json" in table["error"][2]
    assert "meta.json" in table["error"][3]
    assert all("\n" not in e for e in table["error"].dropna())
    assert table["peak_allocated_bytes"].tolist()[0] == 3500 and table["is_max"].tolist()[0]
    assert layout.rank_categories(job)["rank"].tolist() == [0]
    assert layout.rank_timelines(job)["rank"].unique().tolist() == [0]
    s = layout.run_group_summary(job)
    assert s["failed_ranks"] == [1, 2, 3] and s["peak_allocated_bytes"] == 3500


def test_a_job_with_no_readable_rank(tmp_path):
    job = write_job(tmp_path, "dead", {0: 100, 1: 100})
    for part in layout.rank_dirs(job):
        (part / "meta.json").write_text("[]")
    table = layout.rank_table(job)
    assert table["error"].notna().all() and ranks.rank_skew(table)["max_rank"] is None
    assert not table["is_max"].any() and table["skew_pct"].isna().all()
    assert layout.rank_timelines(job).empty and layout.rank_categories(job).empty
    with pytest.raises(TraceError, match="no rank"):
        layout.run_group_summary(job)


def test_cached_summaries_spare_loading_any_trace(two_ranks, monkeypatch):
    first = layout.rank_table(two_ranks)  # computes and caches each rank's summary.json

    def no_trace(*args, **kwargs):
        raise AssertionError("a rank with a cached summary was loaded")

    monkeypatch.setattr("profiler.trace.reader.load_trace", no_trace)
    pd.testing.assert_frame_equal(layout.rank_table(two_ranks), first)
    assert layout.run_group_summary(two_ranks)["peak_allocated_bytes"] == 7500


# -- the dashboard's runs table ---------------------------------------------------------------


@pytest.fixture
def data():
    return pytest.importorskip("dashboard.data", reason="the dashboard needs streamlit")


def test_runs_table_makes_a_job_one_row(data, tmp_path, two_ranks, four_ranks_two_failed):
    single = write_job(tmp_path / "single-out", "plain", {0: 100}) / "rank=0"
    shutil.move(single, tmp_path / "plain")
    table = data.runs_table(tmp_path).set_index("run")
    assert sorted(table.index) == sorted(map(str, (two_ranks, four_ranks_two_failed, tmp_path / "plain")))
    job = table.loc[str(two_ranks)]
    assert (job["run_id"], job["name"], job["world_size"], job["status"]) == ("job2", "job", 2, "complete")
    assert job["peak_allocated_bytes"] == 7500 and pd.isna(job["failed_ranks"]) and pd.isna(job["error"])
    assert job["peak_skew_pct"] == pytest.approx((7500 - 5500) / 5500 * 100)
    failed = table.loc[str(four_ranks_two_failed)]
    assert (failed["world_size"], failed["status"], failed["failed_ranks"]) == (4, "incomplete", "2, 3")
    plain = table.loc[str(tmp_path / "plain")]
    assert pd.isna(plain["world_size"]) and plain["peak_allocated_bytes"] == peak_of(100)
    # A rank partition given as the folder itself is that one run.
    alone = data.runs_table(two_ranks / "rank=1")
    assert alone["run"].tolist() == [str(two_ranks / "rank=1")] and alone["peak_allocated_bytes"][0] == 7500


def test_runs_table_keeps_an_unreadable_job_with_its_world_size(data, tmp_path):
    job = write_job(tmp_path, "dead", {0: 100, 1: 100, 2: 100})
    for part in layout.rank_dirs(job):
        (part / "events.parquet").write_bytes(b"junk")
    row = data.runs_table(tmp_path).iloc[0]
    assert row["run"] == str(job) and row["world_size"] == 3 and "no rank" in row["error"]


def test_ablation_view_has_world_sizes(data, tmp_path, two_ranks):
    single = tmp_path / "plain"
    shutil.move(write_job(tmp_path / "x", "plain", {0: 100}) / "rank=0", single)
    summaries = [layout.run_group_summary(two_ranks), load_summary(single)]
    view = data.ablation_view(summaries, 0, data.ablation_losses(tmp_path), [str(two_ranks), str(single)])
    assert view["world_size"].tolist() == [2, 1]
    assert view["memory_saved_pct"].iloc[1] == pytest.approx((7500 - peak_of(100)) / 7500 * 100)


def test_default_ranks_to_overlay(data, four_ranks_two_failed):
    table = layout.rank_table(four_ranks_two_failed)
    assert ranks.ranks_to_overlay(table, ranks.rank_skew(table)) == [0, 1, 2]
    assert ranks.ranks_to_overlay(table, ranks.rank_skew(table), most=2) == [0, 1]


def test_report_on_a_job_lists_its_ranks_then_the_largest_one(tmp_path, capsys):
    from rank_runs import peak_of, write_job

    from profiler.cli import main

    job = write_job(tmp_path, "job-1", {0: 1000, 1: 3000, 2: 2000}, world_size=4)
    assert main(["report", str(job), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ranks"]["world_size"] == 4
    assert report["ranks"]["skew"]["max_rank"] == 1
    by_rank = {r["rank"]: r for r in report["ranks"]["rows"]}
    assert by_rank[1]["peak_allocated_bytes"] == peak_of(3000) == report["peak"]["allocated_bytes"]
    assert by_rank[3]["status"] == "missing" and by_rank[3]["error"]
    assert report["run"]["path"].endswith("rank=1")
    assert main(["report", str(job)]) == 0
    text = capsys.readouterr().out
    assert text.startswith("vramscope job:") and "largest rank 1" in text and "missing" in text


def test_jobs_inside_an_ablation_folder_are_found(tmp_path):
    from rank_runs import write_job

    from profiler.trace.layout import iter_runs

    write_job(tmp_path / "h200x2-fsdp", "job-a", {0: 1000, 1: 2000})  # <root>/<group>/<job>/rank=N
    write_job(tmp_path, "job-b", {0: 1000})  # <root>/<job>/rank=N
    found = [p.relative_to(tmp_path).as_posix() for p in iter_runs(tmp_path)]
    assert found == ["h200x2-fsdp/job-a/rank=0", "h200x2-fsdp/job-a/rank=1", "job-b/rank=0"]
