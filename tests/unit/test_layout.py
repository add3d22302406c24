"""profiler.trace.layout: meta.json read once (strict and lenient), rank partitions, reading every rank;
and profiler.analysis.ranks computing on records and traces that never touch the disk."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rank_runs import peak_of, write_job

from profiler.analysis import ranks, summary
from profiler.errors import TraceError
from profiler.trace import layout, schema, summary_cache
from profiler.trace import meta as trace_meta
from profiler.trace.model import RankRecord
from profiler.trace.reader import load_trace

# -- meta.json ------------------------------------------------------------------------------


def test_strict_and_lenient_meta(finished_run):
    meta = trace_meta.read_meta(finished_run)
    assert meta["format"] == schema.FORMAT_NAME and trace_meta.read_meta_lenient(finished_run) == meta
    path = finished_run / schema.META_FILE
    path.write_text(json.dumps({"hostname": "h", "world_size": 4}))  # labels, but not a trace's meta
    with pytest.raises(TraceError, match="not a vramscope trace"):
        trace_meta.read_meta(finished_run)
    assert trace_meta.read_meta_lenient(finished_run) == {"hostname": "h", "world_size": 4}
    for text in ("{nope", "[1, 2]", "\xff"):
        path.write_text(text)
        assert trace_meta.read_meta_lenient(finished_run) is None
    path.unlink()
    assert trace_meta.read_meta_lenient(finished_run) is None
    with pytest.raises(TraceError, match="no meta.json"):
        trace_meta.read_meta(finished_run)


def test_world_size_of():
    assert trace_meta.world_size_of({"world_size": 8, "config": {"world_size": 2}}) == 8
    assert trace_meta.world_size_of({"config": {"world_size": 2}}) == 2
    assert trace_meta.world_size_of({"world_size": True, "config": "x"}) is None
    assert trace_meta.world_size_of(None) is None and trace_meta.world_size_of({}) is None


# -- rank partitions --------------------------------------------------------------------------


def test_rank_dirs_are_only_rank_folders(tmp_path):
    job = write_job(tmp_path, "job", {0: 100, 1: 100})
    (job / "rank=7").write_text("a file, not a partition")
    (job / "notes").mkdir()
    assert [p.name for p in layout.rank_dirs(job)] == ["rank=0", "rank=1"]
    assert layout.rank_number(job / "rank=12") == 12 and layout.rank_number(job / "rank=x") is None
    assert layout.run_root_of(job / "rank=1") == job and layout.run_root_of(job / "notes") == job / "notes"
    assert layout.rank_dirs(tmp_path / "nowhere") == []


def test_read_ranks_marks_missing_partitions(tmp_path):
    job = write_job(tmp_path, "job", {0: 100, 2: 300}, world_size=4)
    (job / "rank=2" / "events.parquet").write_bytes(b"junk")
    records = layout.read_ranks(job / "rank=0")  # a partition stands for its job
    assert [(r.rank, r.exists, r.status) for r in records] == [
        (0, True, "complete"),
        (1, False, "missing"),
        (2, True, "unreadable"),
        (3, False, "missing"),
    ]
    assert records[0].summary == summary_cache.load_summary(job / "rank=0") and records[0].error is None
    assert records[2].meta["world_size"] == 4 and "events.parquet" in records[2].error
    assert records[1].meta is None and "no partition rank=1 (world size 4)" in records[1].error


def test_each_loader_has_one_home():
    from profiler import analysis
    from profiler.trace import reader

    for name in (
        "rank_table",
        "rank_categories",
        "rank_timelines",
        "read_ranks",
        "rank_dirs",
        "run_root_of",
        "is_multi_rank",
        "RANK_DIR",
        "rank_number",
        "MISSING",
        "UNREADABLE",
    ):
        assert hasattr(layout, name) and not hasattr(ranks, name), name
    assert hasattr(ranks, "RankRecord") and ranks.RankRecord is layout.RankRecord  # the type analysis takes
    for name in ("SUMMARY_FILE", "load_summaries", "read_summary", "write_summary"):
        assert hasattr(summary_cache, name) and not hasattr(summary, name) and not hasattr(analysis, name), name
    assert not hasattr(analysis, "load_summary")
    assert not hasattr(reader, "iter_runs") and not hasattr(reader, "load_runs")
    assert not hasattr(summary, "load_summary") and not hasattr(ranks, "run_group_summary")


# -- analysis on what was loaded: no file is opened ---------------------------------------------

NOWHERE = Path("/nonexistent/job")


def _summary(peak: int, step_us: float, status: str = "complete") -> dict:
    return {
        "run_id": "job",
        "name": "job",
        "status": status,
        "config": {"world_size": 3},
        "peak_allocated_bytes": peak,
        "median_step_time_us": step_us,
        "steps": 2,
        "events": 10,
        "events_dropped": 0,
        "categories_at_peak_bytes": {"parameter": 100, "activation": peak - 100},
        "category_peak_bytes": {"parameter": 100, "activation": peak - 100},
    }


def _records() -> list[RankRecord]:
    meta = {"hostname": "h", "local_rank": 0, "world_size": 3, "max_allocated_bytes": None}
    return [
        RankRecord(0, NOWHERE / "rank=0", meta, _summary(1000, 10.0), None),
        RankRecord(1, NOWHERE / "rank=1", dict(meta, local_rank=1), _summary(3000, 30.0), None),
        RankRecord(2, NOWHERE / "rank=2", None, None, "never wrote", exists=False),
    ]


def test_rank_table_of_records_alone():
    table = ranks.rank_table_of(_records())
    assert table["rank"].tolist() == [0, 1, 2]
    assert table["status"].tolist() == ["complete", "complete", "missing"]
    assert table["peak_allocated_bytes"].tolist()[:2] == [1000, 3000]  # no allocator maximum: the replay's
    assert table["is_max"].tolist() == [False, True, False] and (table["world_size"] == 3).all()
    assert table["skew_pct"].tolist()[:2] == [-50.0, 50.0]
    assert table["error"].tolist()[2] == "never wrote"


def test_rank_categories_of_records_alone():
    cats = ranks.rank_categories_of(_records())
    assert cats["rank"].tolist() == [0, 1] and cats["peak_allocated_bytes"].tolist() == [1000, 3000]
    assert cats["parameter"].tolist() == [100, 100] and cats["activation"].tolist() == [900, 2900]
    assert cats.drop(columns=["rank", "parameter", "activation", "peak_allocated_bytes"]).eq(0).all().all()
    assert ranks.rank_categories_of(_records(), ranks=[1])["rank"].tolist() == [1]


def test_group_summary_of_records_alone():
    s = ranks.run_group_summary_of(_records(), NOWHERE)
    assert (s["peak_allocated_bytes"], s["peak_rank"], s["median_step_time_us"]) == (3000, 1, 30.0)
    assert (s["status"], s["failed_ranks"], s["world_size"], s["ranks_readable"]) == ("incomplete", [2], 3, 2)
    assert s["events"] == 20 and s["category_peak_bytes"] == {"activation": 2900, "parameter": 100}
    with pytest.raises(TraceError, match="/nonexistent/job: no rank .* \\(never wrote\\)"):
        ranks.run_group_summary_of(_records()[2:], NOWHERE)


def test_rank_timelines_of_loaded_traces(tmp_path):
    job = write_job(tmp_path, "job", {0: 1000, 1: 3000})
    traces = [(r, load_trace(job / f"rank={r}", tables=ranks.TIMELINE_TABLES)) for r in (1, 0)]
    tl = ranks.rank_timelines_of(traces, max_points=100)
    assert list(tl.columns) == list(ranks.TIMELINE_COLUMNS)
    assert tl.groupby("rank")["allocated_bytes"].max().to_dict() == {0: peak_of(1000), 1: peak_of(3000)}
    assert ranks.rank_timelines_of([]).empty
