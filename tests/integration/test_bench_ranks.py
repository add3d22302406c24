"""bench/ranks.py at CPU-test size: a few ranks' partitions, read back by the reader and by duckdb."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from profiler.trace.layout import iter_runs
from profiler.trace.reader import load_trace

duckdb = pytest.importorskip("duckdb")

REPO = Path(__file__).resolve().parents[2]


def _bench_ranks():
    name = "_vramscope_bench_ranks"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "bench" / "ranks.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    bench = _bench_ranks()
    out = tmp_path_factory.mktemp("ranks")
    run_root, ranks, _ = bench.build_job(out, 3, 6_000, jobs=1)
    return bench, run_root, ranks


def test_partitions_load_with_their_rank(job):
    _bench, run_root, ranks = job
    assert sorted(p.name for p in run_root.iterdir()) == ["rank=0", "rank=1", "rank=2"]
    assert iter_runs(run_root.parent) == [run_root / f"rank={r}" for r in range(3)]
    run_ids = set()
    for rank in range(3):
        trace = load_trace(run_root / f"rank={rank}")
        meta = trace.meta
        assert (meta["rank"], meta["world_size"], meta["config"]["world_size"]) == (rank, 3, 3)
        assert meta["local_rank"] == rank and meta["dist_backend"] == "nccl" and meta["hostname"]
        assert meta["status"] == "complete" and meta["block_replay_misses"] == 0
        run_ids.add(meta["run_id"])
        assert len(trace.events) == ranks[rank]["events"] > 6_000
        cats = set(trace.events["category"].dropna().astype(str))
        assert {"all_gather", "reduce_scatter", "unsharded_parameter", "activation"} <= cats
        assert int(trace.steps["max_allocated_bytes"].max()) == meta["max_allocated_bytes"]
    assert run_ids == {run_root.name}
    peaks = {r["max_allocated_bytes"] for r in ranks}
    assert len(peaks) == 3  # the ranks' peaks differ


def test_duckdb_reads_the_job_as_one_dataset_with_a_rank_column(job):
    bench, run_root, ranks = job
    # The query the README shows.
    df = duckdb.sql(f"""
        SELECT rank, max(allocated_bytes) AS max_allocated_bytes
        FROM read_parquet('{run_root.as_posix()}/*/steps.parquet', hive_partitioning = true)
        GROUP BY rank ORDER BY rank""").df()
    assert list(df["rank"]) == [0, 1, 2]
    for row in df.itertuples():
        steps = load_trace(run_root / f"rank={row.rank}", tables=["steps"]).steps
        assert int(row.max_allocated_bytes) == int(steps["allocated_bytes"].max())

    steps_df, _ = bench.duckdb_query(bench.steps_sql(run_root))
    events_df, _ = bench.duckdb_query(bench.events_sql(run_root))
    assert list(steps_df["rank"]) == list(events_df["rank"]) == [0, 1, 2]
    for rank, r in enumerate(ranks):
        trace = load_trace(run_root / f"rank={rank}", tables=["steps"])
        assert int(steps_df["peak_allocated_bytes"][rank]) == trace.meta["max_allocated_bytes"]
        # The replayed peak over every event, plus what was allocated before the capture.
        assert int(events_df["peak_delta_bytes"][rank]) + r["baseline_allocated_bytes"] == r["max_allocated_bytes"]


def test_measure_times_the_pages(job):
    bench, run_root, ranks = job
    res = bench.measure(run_root.parent, run_root, ranks, cold_ranks=False)
    assert res["duckdb_agrees"] and res["duckdb_rows"] == 3
    assert res["runs_errors"] == 0 and res["runs_rows"] >= 1
    assert res["runs_cold_s"] > 0 and res["runs_warm_s"] > 0
    assert 0 < res["peak_skew"] < 0.5
