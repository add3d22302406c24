"""Run summaries and their summary.json cache, comparisons between runs, and the report verb.

The runs are those of analysis_runs.py, whose right answers are worked out there by hand.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import pytest
from analysis_runs import CPU_BASELINE, CPU_EVENTS, MODULES, SEG, cpu, cpu_smaller, cpu_steps, cuda, load  # noqa: F401
from fakes import write_trace

from profiler.analysis import (
    compare,
    compare_categories,
    compare_many,
    compare_modules,
    compare_summaries,
    run_summary,
    summarize,
)
from profiler.analysis.summary import SUMMARY_VERSION
from profiler.cli import report
from profiler.trace import schema
from profiler.trace.summary_cache import SUMMARY_FILE, load_summaries, load_summary, read_summary, write_summary


# -- run_summary ------------------------------------------------------------------------
def test_run_summary_of_the_cpu_run(cpu):
    s = run_summary(cpu)
    assert {k: s[k] for k in ("summary_version", "name", "backend", "device", "torch_version", "status", "config")} == {
        "summary_version": SUMMARY_VERSION,
        "name": "cpu",
        "backend": "cpu",
        "device": "cpu",
        "torch_version": "test",
        "status": "complete",
        "config": {"ckpt": False, "tokens_per_step": 1000},
    }
    assert (s["steps"], s["events"], s["events_dropped"]) == (3, 13, 0)
    assert (s["peak_allocated_bytes"], s["peak_event_index"], s["peak_step"], s["peak_phase"]) == (
        14_500,
        5,
        0,
        "backward",
    )
    assert (s["active_at_peak_bytes"], s["peak_active_bytes"]) == (14_500, 14_500)
    assert s["allocator_max_allocated_bytes"] == 14_500 and s["replay_matches_allocator"] is True
    assert s["peak_reserved_bytes"] is None and s["fragmentation_ratio_at_peak"] is None
    assert s["largest_free_block_at_peak_bytes"] is None
    assert (s["median_step_time_us"], s["tokens_per_step"], s["tokens_per_s"]) == (100.0, 1000, 10_000_000.0)
    assert {c: b for c, b in s["categories_at_peak_bytes"].items() if b} == {
        "other": CPU_BASELINE,
        "activation": 4000,
        "gradient": 500,
    }
    assert sum(s["categories_at_peak_bytes"].values()) == s["peak_allocated_bytes"]
    assert {c: b for c, b in s["category_peak_bytes"].items() if b} == {
        "other": CPU_BASELINE,
        "activation": 4000,
        "temporary": 700,
        "gradient": 500,
    }
    assert json.loads(json.dumps(s, allow_nan=False)) == s  # JSON-ready as it is


def test_run_summary_of_the_cuda_run(cuda):
    s = run_summary(cuda)
    assert (s["peak_allocated_bytes"], s["active_at_peak_bytes"], s["peak_active_bytes"]) == (6656, 7168, 7680)
    assert (s["peak_reserved_bytes"], s["allocator_max_reserved_bytes"]) == (3 * SEG, 3 * SEG)
    assert s["replay_matches_allocator"] is True
    assert s["fragmentation_ratio_at_peak"] == pytest.approx((3 * SEG - 6656) / (3 * SEG))
    assert (
        s["reserved_minus_allocated_at_peak_bytes"],
        s["inactive_split_at_peak_bytes"],
        s["largest_free_block_at_peak_bytes"],
    ) == (3 * SEG - 6656, 6_284_288, SEG - 1024)
    assert {c: b for c, b in s["categories_at_peak_bytes"].items() if b} == {
        "parameter": 1024,
        "activation": 4608,
        "temporary": 1024,
    }
    assert s["category_peak_bytes"]["temporary"] == 2048 and s["category_peak_bytes"]["other"] == 512
    assert (s["steps"], s["events"], s["tokens_per_s"]) == (2, 11, None)


# -- the summary.json cache -------------------------------------------------------------
def _counting_loader(calls: list):
    def load_run(path):
        calls.append(Path(path))
        return load(Path(path))

    return load_run


def _later(path: Path, seconds: float = 5) -> None:
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + int(seconds * 1e9)))


def test_summary_round_trips_through_summary_json(cpu):
    s = run_summary(cpu)
    path = write_summary(cpu.path, s)
    assert path == cpu.path / SUMMARY_FILE
    assert read_summary(cpu.path) == s
    assert not list(cpu.path.glob(f".{SUMMARY_FILE}*"))  # no temporary file left behind


def test_load_summary_computes_once_then_reads_the_cache(cpu):
    calls = []
    first = load_summary(cpu.path, load=_counting_loader(calls))
    assert (cpu.path / SUMMARY_FILE).is_file() and len(calls) == 1
    assert load_summary(cpu.path, load=_counting_loader(calls)) == first and len(calls) == 1
    assert first == run_summary(cpu)


@pytest.mark.parametrize(
    "garbage",
    [
        b"",
        b"{",
        b"\xff\xfe",
        b"[1, 2]",
        b'{"summary_version": 1}',
        json.dumps({"summary_version": SUMMARY_VERSION + 1}).encode(),
    ],
)
def test_a_corrupt_or_foreign_summary_is_recomputed(cpu, garbage):
    write_summary(cpu.path, run_summary(cpu))
    (cpu.path / SUMMARY_FILE).write_bytes(garbage)
    assert read_summary(cpu.path) is None
    calls = []
    assert load_summary(cpu.path, load=_counting_loader(calls))["peak_allocated_bytes"] == 14_500
    assert len(calls) == 1 and read_summary(cpu.path) is not None  # repaired


def test_a_summary_older_than_meta_is_stale(cpu):
    write_summary(cpu.path, run_summary(cpu))
    _later(cpu.path / SUMMARY_FILE, -5)  # meta.json was touched after the summary was written
    assert read_summary(cpu.path) is None
    calls = []
    load_summary(cpu.path, load=_counting_loader(calls))
    assert len(calls) == 1 and read_summary(cpu.path) is not None


def test_a_summary_of_another_meta_is_stale(cpu):
    write_summary(cpu.path, run_summary(cpu))
    meta = cpu.path / schema.META_FILE
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "name": "renamed"}))
    _later(cpu.path / SUMMARY_FILE)  # even when its timestamp says otherwise
    assert read_summary(cpu.path) is None
    assert load_summary(cpu.path, load=_counting_loader([]))["name"] == "renamed"
    assert read_summary(cpu.path)["name"] == "renamed"


def test_meta_rewritten_while_summarising_leaves_the_cache_stale(cpu):
    def finishing_meanwhile(path):
        trace = load(Path(path))
        meta = Path(path) / schema.META_FILE  # e.g. the run's final meta.json lands now
        meta.write_text(json.dumps({**trace.meta, "status": "oom"}))
        return trace

    assert load_summary(cpu.path, load=finishing_meanwhile)["status"] == "complete"
    assert (cpu.path / SUMMARY_FILE).is_file()
    assert read_summary(cpu.path) is None
    assert load_summary(cpu.path, load=_counting_loader([]))["status"] == "oom"


def test_a_running_capture_is_summarised_but_not_cached(tmp_path):
    run = write_trace(tmp_path, CPU_EVENTS, status=None)  # journals only, as while capturing
    s = load_summary(run)  # through the reader
    assert s["status"] == "running" and s["peak_allocated_bytes"] == 14_500 - CPU_BASELINE
    assert not (run / SUMMARY_FILE).exists()


def test_a_failed_write_keeps_the_previous_summary(cpu):
    good = run_summary(cpu)
    write_summary(cpu.path, good)
    with pytest.raises(ValueError):
        write_summary(cpu.path, {**good, "median_step_time_us": float("nan")})
    assert read_summary(cpu.path) == good
    assert not list(cpu.path.glob(f".{SUMMARY_FILE}*"))


def test_an_unwritable_run_still_gets_its_summary(cpu, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError("read-only")

    monkeypatch.setattr("profiler.trace.summary_cache.write_summary", refuse)
    assert load_summary(cpu.path, load=_counting_loader([]))["peak_allocated_bytes"] == 14_500


# -- compare ----------------------------------------------------------------------------
def test_summarize_is_one_flat_row(cpu):
    s = summarize(cpu)
    assert s["name"] == "cpu" and s["config.ckpt"] is False and "config" not in s
    assert (s["peak_allocated_bytes"], s["at_peak.activation"], s["category_peak.temporary"]) == (14_500, 4000, 700)


def test_compare_deltas(cpu, cpu_smaller):
    for a, b in ((cpu, cpu_smaller), (run_summary(cpu), run_summary(cpu_smaller))):  # traces or summaries
        df = compare(a, b).set_index("metric")
        assert df.loc["peak_allocated_bytes", ["a", "b", "delta"]].tolist() == [14_500, 13_500, -1000]
        assert df.loc["peak_allocated_bytes", "delta_pct"] == pytest.approx(-1000 / 14_500 * 100)
        assert df.loc["memory_saved_pct", "delta_pct"] == pytest.approx(1000 / 14_500 * 100)
        assert df.loc["median_step_time_us", ["a", "b", "delta"]].tolist() == [100.0, 80.0, -20.0]
        assert df.loc["speed_change_pct", "delta_pct"] == pytest.approx(25.0)
        assert df.loc["peak_reserved_bytes", "delta"] is None


def test_compare_categories_and_modules(cpu, cpu_smaller):
    for a, b in ((cpu, cpu_smaller), (run_summary(cpu), run_summary(cpu_smaller))):
        cats = compare_categories(a, b)
        assert cats.iloc[0][["category", "a_bytes", "b_bytes", "delta_bytes"]].tolist() == [
            "activation",
            4000,
            3000,
            -1000,
        ]
        assert cats["delta_bytes"].iloc[1:].eq(0).all()
    mods = compare_modules(cpu, cpu_smaller)
    assert mods.iloc[0][["module", "a_bytes", "b_bytes", "delta_bytes"]].tolist() == ["l2", 3500, 2500, -1000]
    assert mods.iloc[0]["delta_pct"] == pytest.approx(-1000 / 3500 * 100)


def test_compare_many(cpu, cpu_smaller):
    df = compare_many([cpu, cpu_smaller], baseline=cpu.run_id)
    assert df["name"].tolist() == ["cpu", "smaller"]
    assert df["is_baseline"].tolist() == [True, False]
    assert df["config.ckpt"].tolist() == [False, True]
    assert df["memory_saved_pct"].iloc[1] == pytest.approx(1000 / 14_500 * 100)
    assert df["speed_change_pct"].tolist() == pytest.approx([0.0, 25.0])
    assert compare_many([cpu, cpu_smaller], baseline=cpu_smaller)["is_baseline"].tolist() == [False, True]
    with pytest.raises(ValueError):
        compare_many([cpu], baseline="nope")


def test_compare_summaries_from_the_cache(cpu, cpu_smaller):
    def no_trace(path):
        raise AssertionError(f"{path} was loaded although its summary.json is fresh")

    for t in (cpu, cpu_smaller):
        write_summary(t.path, run_summary(t))
    summaries = load_summaries([cpu.path, cpu_smaller.path], load=no_trace)
    df = compare_summaries(summaries, baseline=1)
    assert df["is_baseline"].tolist() == [False, True]
    assert df["peak_allocated_bytes"].tolist() == [14_500, 13_500]
    assert df["memory_saved_pct"].iloc[0] == pytest.approx(-1000 / 13_500 * 100)
    assert df.equals(compare_many(summaries, baseline=1))


# -- the report verb --------------------------------------------------------------------
def _report(run_dir: Path, capsys, **kw) -> str:
    args = argparse.Namespace(run=str(run_dir), top=kw.get("top", 10), json=kw.get("json", False))
    assert report.run(args) == 0
    return capsys.readouterr().out


def test_report_text(cpu, capsys):
    out = _report(cpu.path, capsys)
    assert "Peak allocated   14.16 KiB (14,500 B)  step 0, phase backward, event 5" in out
    assert "Active then      14.16 KiB (14,500 B)\n" in out
    assert "median step 0.1 ms   10,000,000 tokens/s" in out
    assert "replay agrees" in out
    assert "n/a (the CPU backend" in out
    lines = out.splitlines()
    top = lines.index("Top 2 modules by bytes alive at the peak")
    assert lines[top + 2].split()[:3] == ["l2", "Linear", "3.42"]
    assert any(line.split()[:4] == ["activation", "3.91", "KiB", "4,000"] for line in lines)
    assert any(line.split()[:4] == ["other", "9.77", "KiB", "10,000"] for line in lines)


def test_report_cuda_fragmentation_and_top(cuda, capsys):
    out = _report(cuda.path, capsys, top=1)
    assert "Peak allocated   6.50 KiB (6,656 B)  step 1, phase backward, event 5" in out
    assert "Active then      7.00 KiB (7,168 B)  (512 B freed, not yet released)" in out
    assert "Peak reserved    6.00 MiB (6,291,456 B)" in out
    assert "inactive split        5.99 MiB (6,284,288 B)" in out
    assert "largest free block    2.00 MiB (2,096,128 B)" in out
    assert "fragmentation ratio   99.9%" in out
    assert "Top 1 modules" in out


def test_report_json(cuda, capsys):
    data = json.loads(_report(cuda.path, capsys, json=True))
    assert data["peak"] == {
        "allocated_bytes": 6656,
        "active_bytes": 7168,
        "reserved_bytes": 3 * SEG,
        "step": 1,
        "phase": "backward",
        "event_index": 5,
        "ts_us": 1_050,
    }
    assert data["allocator"]["replay_matches"] is True
    assert data["run"]["backend"] == "cuda" and data["run"]["events"] == 11
    assert {c["category"]: c["total_bytes"] for c in data["categories"]} == {
        "activation": 4608,
        "parameter": 1024,
        "temporary": 1024,
    }
    assert data["fragmentation"]["inactive_split_bytes"] == 6_284_288
    assert data["fragmentation"]["active_bytes"] == 7168
    assert data["modules"][0]["module"] == "m"


def test_report_flags_a_replay_that_disagrees(tmp_path, capsys):
    run = write_trace(tmp_path, CPU_EVENTS, max_allocated_bytes=5000)
    out = _report(run, capsys)
    assert "replay DIFFERS by -500 B" in out  # no baseline: the replay peaks at 4,500


def test_report_through_the_cli(cpu, capsys):
    from profiler.cli import main

    assert main(["report", str(cpu.path), "--top", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["peak"]["allocated_bytes"] == 14_500
    assert main(["report", str(cpu.path), "--top", "-3"]) == 2


@pytest.mark.parametrize("table", ["events.parquet", "frames.parquet"])
def test_a_summary_is_not_trusted_once_its_trace_is_corrupt(cpu, table):
    """A table overwritten with garbage after the summary was cached (the summary names a run
    that can no longer be read): the cache is stale, and recomputing says why."""
    from profiler.errors import TraceError

    load_summary(cpu.path, load=_counting_loader([]))
    assert read_summary(cpu.path) is not None
    path = cpu.path / table
    st = path.stat()
    path.write_bytes(b"\0" * st.st_size)  # same size
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # same time: only the bytes say it
    assert read_summary(cpu.path) is None
    if table == "events.parquet":
        with pytest.raises(TraceError):
            load_summary(cpu.path)


def test_a_summary_is_not_trusted_once_a_table_is_gone_or_rewritten(cpu):
    load_summary(cpu.path, load=_counting_loader([]))
    _later(cpu.path / "steps.parquet")  # rewritten since
    assert read_summary(cpu.path) is None
    load_summary(cpu.path, load=_counting_loader([]))
    assert read_summary(cpu.path) is not None
    (cpu.path / "steps.parquet").unlink()
    assert read_summary(cpu.path) is None
