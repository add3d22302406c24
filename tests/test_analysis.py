"""Analysis on hand-built traces whose right answers are worked out by hand, in exact bytes.

Two runs carry most tests:
- CPU_EVENTS: a CPU run with 10,000 bytes alive before capture (no blocks to show for them),
  two modules, a gradient, an optimizer temporary. The peak is 14,500 bytes at event 4.
- CUDA_EVENTS: a CUDA run over a hand-drawn address space of two start segments (one with
  a free gap between two live blocks) plus a segment allocated during the run.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from fakes import write_trace
from profiler import schema
from profiler.analysis import (alive_at_peak, allocator_counters, breakdown, category_at_peak,
                               category_timeline, compare, compare_categories, compare_many,
                               compare_modules, downsample, fragmentation, fragmentation_at_peak,
                               live_at, memory_timeline, module_table, peak, phase_spans, rollup,
                               segment_map_at, step_spans, summarize)
from profiler.analysis.categories import category_names
from profiler.analysis.timeline import Peak
from profiler.cli import report
from profiler.trace import Trace


def load(run_dir: Path) -> Trace:
    """The trace as analysis sees it, read straight from the Parquet files (no reader logic)."""
    meta = json.loads((run_dir / schema.META_FILE).read_text())
    tables = {t: pq.read_table(run_dir / schema.parquet_name(t)).to_pandas() for t in schema.TABLE_NAMES}
    return Trace(path=run_dir, meta=meta, **tables)


# -- the CPU run ------------------------------------------------------------------------
CPU_BASELINE = 10_000
CPU_EVENTS = [
    ("alloc", 0x1000, 1000, "forward", "l1"),  # 0  activation: freed in backward
    ("alloc", 0x2000, 200, "forward", "l1"),  # 1  temporary: freed in forward
    ("free_completed", 0x2000, 200, "forward", "l1"),  # 2
    ("alloc", 0x3000, 3000, "forward", "l2"),  # 3  activation
    ("alloc", 0x4000, 500, "backward", "l2", "gradient"),  # 4  the peak: 14,500
    ("free_completed", 0x3000, 3000, "backward", "l2"),  # 5
    ("free_completed", 0x1000, 1000, "backward", "l1"),  # 6
    ("alloc", 0x5000, 700, "optimizer", None),  # 7
    ("free_completed", 0x5000, 700, "optimizer", None),  # 8
]
CPU_ALLOCATED = [11_000, 11_200, 11_000, 14_000, 14_500, 11_500, 10_500, 11_200, 10_500]
MODULES = [
    dict(module="model", parent=None, class_name="Net", depth=0, param_bytes=0, buffer_bytes=0,
         param_count=0),
    dict(module="l1", parent="model", class_name="Linear", depth=1, param_bytes=4096, buffer_bytes=0,
         param_count=1024),
    dict(module="l2", parent="model", class_name="Linear", depth=1, param_bytes=8192, buffer_bytes=0,
         param_count=2048),
]


def cpu_steps(step_us: int) -> list[dict]:
    return [dict(step=s, ts_us=2_000 + step_us * s, allocated_bytes=10_500, reserved_bytes=None,
                 max_allocated_bytes=14_500, num_alloc_retries=None) for s in range(3)]


@pytest.fixture
def cpu(tmp_path) -> Trace:
    return load(write_trace(tmp_path, CPU_EVENTS, name="cpu", modules=MODULES, steps=cpu_steps(100),
                            baseline_allocated_bytes=CPU_BASELINE, config={"ckpt": False}))


# -- the CUDA run -----------------------------------------------------------------------
# Segments of the small pool are 2 MiB and its blocks 512-byte multiples, as torch makes them,
# so that the writer's block replay hands every block back at its requested size.
SEG = 2 << 20
S1, S2, S3 = 0x1000000, 0x1000000 + SEG, 0x1000000 + 2 * SEG


def _block(seg, addr, size, state):
    return dict(snapshot="start", ts_us=990, event_index=0, segment_addr=seg, segment_bytes=SEG,
                stream=0, segment_type="small", is_expandable=False, block_addr=addr,
                block_bytes=size, requested_bytes=size, state=state)


# S1: live 1024 | free 1024 | live 512 | free to the end.  S2: all free.
CUDA_SEGMENTS = [
    _block(S1, S1, 1024, "active_allocated"),
    _block(S1, S1 + 0x400, 1024, "inactive"),
    _block(S1, S1 + 0x800, 512, "active_allocated"),
    _block(S1, S1 + 0xA00, SEG - 0xA00, "inactive"),
    _block(S2, S2, SEG, "inactive"),
]
CUDA_EVENTS = [
    ("alloc", S1 + 0x400, 512, "forward", "m"),  # 0  into S1's middle gap
    ("segment_alloc", S3, SEG, "forward", "m"),  # 1
    ("alloc", S3, 4096, "forward", "m"),  # 2
    ("free_completed", S1 + 0x800, 512, "backward", "m"),  # 3  a baseline block goes
    ("alloc", S2, 1024, "backward", "m"),  # 4  the peak: 6,656
    ("free_requested", S3, 4096, "backward", "m"),  # 5
    ("free_completed", S3, 4096, "backward", "m"),  # 6
    ("segment_free", S3, SEG, "backward", "m"),  # 7
]
CUDA_ALLOCATED = [2048, 2048, 6144, 5632, 6656, 6656, 2560, 2560]
CUDA_RESERVED = [2 * SEG] + [3 * SEG] * 6 + [2 * SEG]


@pytest.fixture
def cuda(tmp_path) -> Trace:
    role = dict(ts_us=995, event_index=0, step=0, addr=S1, size_bytes=1024, role="parameter", name="w")
    run = write_trace(tmp_path, CUDA_EVENTS, name="cuda", segments=CUDA_SEGMENTS, roles=[role],
                      step_of=lambda i: i // 4, backend="cuda", device="cuda:0",
                      baseline_allocated_bytes=1536, max_reserved_bytes=3 * SEG)
    return load(run)


# -- timeline ---------------------------------------------------------------------------
def test_timeline_replays_allocated_bytes_exactly(cpu):
    tl = memory_timeline(cpu)
    assert tl["allocated_bytes"].tolist() == CPU_ALLOCATED
    assert tl["allocated_bytes"].dtype == np.int64
    assert tl["event_index"].tolist() == list(range(9))
    assert tl["reserved_bytes"].isna().all()  # CPU: null, never zero
    assert (tl["active_bytes"] == tl["allocated_bytes"]).all()  # no free is pending on CPU


def test_peak_equals_replay_and_allocator_max(cpu):
    p = peak(cpu)
    assert p == Peak(event_index=4, ts_us=1_040, step=0, phase="backward", allocated_bytes=14_500)
    assert p.allocated_bytes == cpu.meta["max_allocated_bytes"] == max(CPU_ALLOCATED)


def test_cuda_timeline_reserved_and_pending(cuda):
    tl = memory_timeline(cuda)
    assert tl["allocated_bytes"].tolist() == CUDA_ALLOCATED
    assert tl["reserved_bytes"].tolist() == CUDA_RESERVED
    pending = (tl["active_bytes"] - tl["allocated_bytes"]).tolist()
    assert pending == [0, 0, 0, 0, 0, 4096, 0, 0]  # between free_requested and free_completed
    assert peak(cuda).allocated_bytes == 6656 == cuda.meta["max_allocated_bytes"]


def test_peak_before_the_first_event(tmp_path):
    events = [("free_completed", 0x10, 100, "forward", "a"), ("alloc", 0x20, 50, "backward", "a")]
    t = load(write_trace(tmp_path, events, baseline_allocated_bytes=1000))
    assert peak(t) == Peak(-1, None, None, None, 1000)
    assert live_at(t, -1)["size_bytes"].sum() == 1000


def test_downsample_keeps_the_global_max_and_min():
    rng = np.random.default_rng(7)
    values = np.cumsum(rng.integers(-1000, 1001, 200_000)).astype(np.int64)
    top, bottom = int(np.argmax(values)), int(np.argmin(values))
    reserved = pd.array(values + 5, dtype="Int64")
    reserved[:10] = pd.NA
    df = pd.DataFrame({"event_index": np.arange(len(values)), "allocated_bytes": values,
                       "reserved_bytes": reserved})
    out = downsample(df, 200, ["allocated_bytes", "reserved_bytes"])
    assert len(out) <= 200
    assert top in set(out["event_index"]) and bottom in set(out["event_index"])
    assert out["allocated_bytes"].max() == values.max()
    assert out["event_index"].is_monotonic_increasing
    assert out["event_index"].iloc[0] == 0 and out["event_index"].iloc[-1] == len(values) - 1
    assert downsample(df.head(50), 200, ["allocated_bytes"]).equals(df.head(50))


def test_timeline_downsampled_before_the_frame_is_built(tmp_path):
    events = [("alloc", 0x1000 + i, 512 * (i % 7 + 1), "forward" if i < 150 else "backward", "m")
              for i in range(300)]
    events += [("free_completed", 0x1000 + i, 512 * (i % 7 + 1), "backward", "m") for i in range(300)]
    t = load(write_trace(tmp_path, events))
    small = memory_timeline(t, max_points=30)
    assert len(small) <= 30
    assert small["allocated_bytes"].max() == t.meta["max_allocated_bytes"] == peak(t).allocated_bytes
    full = memory_timeline(t).set_index("event_index")
    assert small.set_index("event_index")["allocated_bytes"].equals(full.loc[small["event_index"], "allocated_bytes"])


def test_block_bytes_win_over_requested_sizes(cpu):
    # The allocator counts rounded blocks; a trace that records them is replayed in blocks.
    blocks = cpu.events["size_bytes"].astype("float64") + 24
    blocks[cpu.events["action"].astype(str) == "segment_alloc"] = np.nan
    cpu.events["block_bytes"] = blocks
    assert memory_timeline(cpu)["allocated_bytes"].tolist() == [
        11_024, 11_248, 11_024, 14_048, 14_572, 11_548, 10_524, 11_248, 10_524]
    live = alive_at_peak(cpu)
    assert live["size_bytes"].sum() == 14_572
    assert live.dropna(subset=["addr"])["requested_bytes"].tolist() == [1000, 3000, 500]


def test_step_and_phase_spans(cuda, cpu):
    steps = step_spans(cuda)
    assert steps[["step", "event_index_start", "event_index_end", "peak_allocated_bytes"]] \
        .values.tolist() == [[0, 0, 3, 6144], [1, 4, 7, 6656]]
    # No phases table: first and last event of each (step, phase).
    spans = phase_spans(cuda)
    assert spans[["step", "phase", "event_index_start", "event_index_end"]].values.tolist() == [
        [0, "forward", 0, 2], [0, "backward", 3, 3], [1, "backward", 4, 7]]
    assert phase_spans(cpu)["phase"].tolist() == ["forward", "backward", "optimizer"]


def test_phase_spans_from_the_phases_table(tmp_path):
    phases = [dict(step=0, phase="forward", ts_us_start=1_000, ts_us_end=1_035),
              dict(step=0, phase="backward", ts_us_start=1_036, ts_us_end=1_070)]
    t = load(write_trace(tmp_path, CPU_EVENTS, phases=phases))
    spans = phase_spans(t)
    assert spans[["phase", "event_index_start", "event_index_end"]].values.tolist() == [
        ["forward", 0, 3], ["backward", 4, 7]]


# -- live -------------------------------------------------------------------------------
def test_live_at_peak_holds_exactly_the_allocated_bytes(cpu):
    live = alive_at_peak(cpu)
    known = live[live["addr"].notna()]
    assert known[["addr", "size_bytes", "module", "phase", "category", "alloc_index"]].values.tolist() == [
        [0x1000, 1000, "l1", "forward", "activation", 0],
        [0x3000, 3000, "l2", "forward", "activation", 3],
        [0x4000, 500, "l2", "backward", "gradient", 4],
    ]
    # The 10,000 bytes that pre-date a CPU capture have no block: one unattributed row.
    assert live["size_bytes"].sum() == 14_500
    assert live.loc[live["addr"].isna(), "size_bytes"].tolist() == [CPU_BASELINE]


def test_live_at_other_moments(cpu, cuda):
    assert live_at(cpu, 2)["addr"].dropna().tolist() == [0x1000]
    assert live_at(cpu, 8)["size_bytes"].sum() == 10_500
    with pytest.raises(ValueError):
        live_at(cpu, 9)
    # Baseline blocks are alive until their own free; they carry their category.
    live = live_at(cuda, 2)
    assert live[["addr", "size_bytes", "category", "alloc_index"]].values.tolist() == [
        [S1, 1024, "parameter", -1], [S1 + 0x800, 512, "other", -1],
        [S1 + 0x400, 512, "activation", 0], [S3, 4096, "activation", 2]]
    assert S1 + 0x800 not in set(live_at(cuda, 3)["addr"])


def test_breakdowns(cpu):
    live = alive_at_peak(cpu)
    by_module = breakdown(live, "module")
    assert by_module[["module", "total_bytes", "count"]].values.tolist() == [
        [None, 10_000, 0], ["l2", 3500, 2], ["l1", 1000, 1]]
    assert by_module["share"].tolist() == pytest.approx([10_000 / 14_500, 3500 / 14_500, 1000 / 14_500])
    by_both = breakdown(live, ["module", "category"])
    assert by_both.iloc[1][["module", "category", "total_bytes"]].tolist() == ["l2", "activation", 3000]
    assert breakdown(live, "stack_id")["total_bytes"].sum() == 14_500


# -- modules ----------------------------------------------------------------------------
def test_module_table(cpu):
    table = module_table(cpu).set_index("module")
    assert table.loc["l1", ["forward_alloc_bytes", "backward_alloc_bytes", "retained_bytes",
                            "peak_contribution_bytes", "param_bytes"]].tolist() == [1200, 0, 1000, 1000, 4096]
    assert table.loc["l2", ["forward_alloc_bytes", "backward_alloc_bytes", "retained_bytes",
                            "peak_contribution_bytes", "param_bytes"]].tolist() == [3000, 500, 3000, 3500, 8192]
    assert table.loc["l2", "class_name"] == "Linear" and table.loc["l2", "depth"] == 1
    assert table.index[0] == "l2"  # sorted by contribution to the peak


def test_module_table_recompute_and_unknown_modules(tmp_path):
    events = [
        ("alloc", 0x10, 100, "forward", "blocks.0.mlp"),
        ("alloc", 0x20, 40, "recompute", "blocks.0.mlp"),
        ("free_completed", 0x20, 40, "backward", "blocks.0.mlp"),
        ("alloc", 0x30, 60, "backward", "blocks.0"),
    ]
    mods = [dict(module="blocks", parent=None, class_name="ModuleList", depth=0, param_bytes=0,
                 buffer_bytes=0, param_count=0)]
    t = load(write_trace(tmp_path, events, modules=mods))
    table = module_table(t).set_index("module")
    assert table.loc["blocks.0.mlp", "recompute_alloc_bytes"] == 40
    assert table.loc["blocks.0.mlp", "forward_alloc_bytes"] == 100
    # Only seen in events: placed under its dotted parent.
    assert table.loc["blocks.0", "parent"] == "blocks" and table.loc["blocks.0", "depth"] == 1
    assert table.loc["blocks.0.mlp", "parent"] == "blocks.0" and table.loc["blocks.0.mlp", "depth"] == 2
    rolled = rollup(table.reset_index()).set_index("module")
    assert rolled.loc["blocks", "subtree_forward_alloc_bytes"] == 100
    assert rolled.loc["blocks", "subtree_backward_alloc_bytes"] == 60


def test_rollup_sums_subtrees(cpu):
    rolled = rollup(module_table(cpu)).set_index("module")
    assert rolled.loc["model", "subtree_forward_alloc_bytes"] == 4200
    assert rolled.loc["model", "subtree_peak_contribution_bytes"] == 4500
    assert rolled.loc["model", "subtree_param_bytes"] == 12_288
    assert rolled.loc["l1", "subtree_param_bytes"] == 4096  # a leaf is its own subtree


# -- categories -------------------------------------------------------------------------
def test_category_columns_sum_to_allocated_at_every_row(cpu, cuda):
    for trace in (cpu, cuda):
        tl = category_timeline(trace)
        cats = [c for c in category_names() if c in tl]
        assert (tl[cats].sum(axis=1) == tl["allocated_bytes"]).all()
    tl = category_timeline(cuda).set_index("event_index")
    # Baseline blocks count in their category from the start.
    assert tl.loc[0, "parameter"] == 1024 and tl.loc[0, "other"] == 512
    assert tl.loc[4, ["parameter", "activation", "temporary", "other"]].tolist() == [1024, 4608, 1024, 0]


def test_category_timeline_downsampled_keeps_the_peak(tmp_path):
    events = []
    for i in range(300):
        events.append(("alloc", 0x1000 + i, 100 + i, "forward" if i % 2 else "backward", "m"))
    for i in range(300):
        events.append(("free_completed", 0x1000 + i, 100 + i, "backward", "m"))
    t = load(write_trace(tmp_path, events))
    tl = category_timeline(t, max_points=40)
    assert len(tl) <= 40
    assert tl["allocated_bytes"].max() == t.meta["max_allocated_bytes"]
    assert (tl[category_names()].sum(axis=1) == tl["allocated_bytes"]).all()


def test_category_at_peak(cpu, cuda):
    at_peak = category_at_peak(cpu).set_index("category")
    assert at_peak.loc["other", "total_bytes"] == CPU_BASELINE  # pre-capture bytes have no category
    assert at_peak.loc["activation", ["total_bytes", "count"]].tolist() == [4000, 2]
    assert at_peak.loc["gradient", "total_bytes"] == 500
    assert at_peak["total_bytes"].sum() == 14_500
    assert set(at_peak.index) >= set(category_names())
    gpu = category_at_peak(cuda).set_index("category")["total_bytes"]
    assert (gpu["parameter"], gpu["activation"], gpu["temporary"], gpu.sum()) == (1024, 4608, 1024, 6656)


# -- fragmentation ----------------------------------------------------------------------
def test_segment_map_at_the_start(cuda):
    seg = segment_map_at(cuda, -1)
    assert seg[["segment_addr", "block_addr", "size_bytes", "state"]].values.tolist() == [
        [S1, S1, 1024, "active_allocated"], [S1, S1 + 0x400, 1024, "inactive"],
        [S1, S1 + 0x800, 512, "active_allocated"], [S1, S1 + 0xA00, SEG - 0xA00, "inactive"],
        [S2, S2, SEG, "inactive"]]
    assert seg["category"].tolist()[0] == "parameter"
    assert set(seg["segment_bytes"]) == {SEG}


def test_segment_map_coalesces_free_space(cuda):
    seg = segment_map_at(cuda, 4)  # the peak: S1's freed block joined the free space around it
    assert seg[["segment_addr", "block_addr", "size_bytes", "state"]].values.tolist() == [
        [S1, S1, 1024, "active_allocated"], [S1, S1 + 0x400, 512, "active_allocated"],
        [S1, S1 + 0x600, SEG - 0x600, "inactive"],
        [S2, S2, 1024, "active_allocated"], [S2, S2 + 0x400, SEG - 0x400, "inactive"],
        [S3, S3, 4096, "active_allocated"], [S3, S3 + 0x1000, SEG - 0x1000, "inactive"]]
    assert segment_map_at(cuda, 5).query("block_addr == @S3")["state"].tolist() == ["active_pending_free"]


def test_fragmentation_at_step_boundaries_and_peak(cuda):
    frag = fragmentation(cuda)
    assert frag["point"].tolist() == ["step_end", "peak", "step_end"]
    cols = ["event_index", "reserved_bytes", "allocated_bytes", "reserved_minus_allocated_bytes",
            "inactive_split_bytes", "largest_free_block_bytes"]
    s1_free, s2_free, s3_free = SEG - 1536, SEG - 1024, SEG - 4096
    assert frag[cols].values.tolist() == [
        # S2 is wholly free: not a split, but the largest free block.
        [3, 3 * SEG, 5632, 3 * SEG - 5632, s1_free + s3_free, SEG],
        [4, 3 * SEG, 6656, 3 * SEG - 6656, s1_free + s2_free + s3_free, s2_free],
        [7, 2 * SEG, 2560, 2 * SEG - 2560, s1_free + s2_free, s2_free],
    ]
    assert frag["fragmentation_ratio"].tolist() == pytest.approx(
        [(3 * SEG - 5632) / (3 * SEG), (3 * SEG - 6656) / (3 * SEG), (2 * SEG - 2560) / (2 * SEG)])
    at_peak = fragmentation_at_peak(cuda)
    assert at_peak["inactive_split_bytes"] == 6_284_800 and at_peak["largest_free_block_bytes"] == 2_096_128
    every = fragmentation(cuda, every_n_events=2)
    assert every.loc[every["point"] == "every_n", "event_index"].tolist() == [1, 3, 5, 7]


def test_fragmentation_on_cpu_is_null(cpu):
    frag = fragmentation(cpu)
    assert frag["point"].tolist() == ["peak", "step_end"]
    assert frag["allocated_bytes"].tolist() == [14_500, 10_500]
    for c in ("reserved_bytes", "inactive_split_bytes", "largest_free_block_bytes", "fragmentation_ratio"):
        assert frag[c].isna().all()
    assert segment_map_at(cpu, 4).empty
    assert fragmentation_at_peak(cpu)["reserved_bytes"] is None


def test_expandable_segments_grow_and_shrink(tmp_path):
    base, mib = 0x7000000000, 1 << 20
    events = [
        ("segment_map", base, 20 * mib, "forward", "m"),
        ("alloc", base, 2 * mib, "forward", "m"),
        ("segment_map", base + 20 * mib, 20 * mib, "forward", "m"),  # grows the same segment
        ("alloc", base + 2 * mib, 4 * mib, "backward", "m"),
        ("segment_unmap", base + 30 * mib, 10 * mib, "backward", "m"),
    ]
    t = load(write_trace(tmp_path, events, backend="cuda"))
    assert memory_timeline(t)["reserved_bytes"].tolist() == [m * mib for m in (20, 20, 40, 40, 30)]
    grown = segment_map_at(t, 3)
    assert grown[["segment_addr", "block_addr", "size_bytes", "state"]].values.tolist() == [
        [base, base, 2 * mib, "active_allocated"], [base, base + 2 * mib, 4 * mib, "active_allocated"],
        [base, base + 6 * mib, 34 * mib, "inactive"]]
    assert set(segment_map_at(t, 4)["segment_bytes"]) == {30 * mib}
    row = fragmentation(t).iloc[-1]
    assert (row["reserved_bytes"], row["largest_free_block_bytes"]) == (30 * mib, 24 * mib)


def test_allocator_counters_are_the_steps_table(cpu):
    counters = allocator_counters(cpu)
    assert counters["step"].tolist() == [0, 1, 2]
    assert counters["max_allocated_bytes"].tolist() == [14_500] * 3
    assert "num_alloc_retries" in counters and "inactive_split_bytes" in counters


# -- compare ----------------------------------------------------------------------------
@pytest.fixture
def cpu_smaller(tmp_path) -> Trace:
    """The CPU run with l2 keeping 2,000 instead of 3,000 bytes, and 80 us steps instead of 100."""
    events = [(a, addr, 2000 if addr == 0x3000 else size, *rest) for a, addr, size, *rest in CPU_EVENTS]
    return load(write_trace(tmp_path / "b", events, name="smaller", modules=MODULES, steps=cpu_steps(80),
                            baseline_allocated_bytes=CPU_BASELINE, config={"ckpt": True}))


def test_summarize(cpu):
    s = summarize(cpu)
    assert s["name"] == "cpu" and s["backend"] == "cpu" and s["status"] == "complete"
    assert s["config.ckpt"] is False
    assert (s["peak_allocated_bytes"], s["allocator_max_allocated_bytes"]) == (14_500, 14_500)
    assert s["replay_matches_allocator"] is True
    assert s["peak_reserved_bytes"] is None and s["fragmentation_ratio_at_peak"] is None
    assert (s["median_step_time_us"], s["steps"], s["events"], s["events_dropped"]) == (100.0, 3, 9, 0)


def test_compare_deltas(cpu, cpu_smaller):
    df = compare(cpu, cpu_smaller).set_index("metric")
    assert df.loc["peak_allocated_bytes", ["a", "b", "delta"]].tolist() == [14_500, 13_500, -1000]
    assert df.loc["peak_allocated_bytes", "delta_pct"] == pytest.approx(-1000 / 14_500 * 100)
    assert df.loc["memory_saved_pct", "delta_pct"] == pytest.approx(1000 / 14_500 * 100)
    assert df.loc["median_step_time_us", ["a", "b", "delta"]].tolist() == [100.0, 80.0, -20.0]
    assert df.loc["speed_change_pct", "delta_pct"] == pytest.approx(25.0)
    assert df.loc["peak_reserved_bytes", "delta"] is None


def test_compare_categories_and_modules(cpu, cpu_smaller):
    cats = compare_categories(cpu, cpu_smaller)
    assert cats.iloc[0][["category", "a_bytes", "b_bytes", "delta_bytes"]].tolist() == \
        ["activation", 4000, 3000, -1000]
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
    with pytest.raises(ValueError):
        compare_many([cpu], baseline="nope")


# -- the report verb --------------------------------------------------------------------
def _report(run_dir: Path, capsys, **kw) -> str:
    args = argparse.Namespace(run=str(run_dir), top=kw.get("top", 10), json=kw.get("json", False))
    assert report.run(args) == 0
    return capsys.readouterr().out


def test_report_text(cpu, capsys):
    out = _report(cpu.path, capsys)
    assert "Peak allocated   14.16 KiB (14,500 B)  step 0, phase backward, event 4" in out
    assert "replay agrees" in out
    assert "n/a (the CPU backend" in out
    lines = out.splitlines()
    top = lines.index("Top 2 modules by bytes alive at the peak")
    assert lines[top + 2].split()[:3] == ["l2", "Linear", "3.42"]
    assert any(line.split()[:4] == ["activation", "3.91", "KiB", "4,000"] for line in lines)
    assert any(line.split()[:4] == ["other", "9.77", "KiB", "10,000"] for line in lines)


def test_report_cuda_fragmentation_and_top(cuda, capsys):
    out = _report(cuda.path, capsys, top=1)
    assert "Peak reserved    6.00 MiB (6,291,456 B)" in out
    assert "inactive split        5.99 MiB (6,284,800 B)" in out
    assert "largest free block    2.00 MiB (2,096,128 B)" in out
    assert "fragmentation ratio   99.9%" in out
    assert "Top 1 modules" in out


def test_report_json(cuda, capsys):
    data = json.loads(_report(cuda.path, capsys, json=True))
    assert data["peak"] == {"allocated_bytes": 6656, "reserved_bytes": 3 * SEG, "step": 1,
                            "phase": "backward", "event_index": 4, "ts_us": 1_040}
    assert data["allocator"]["replay_matches"] is True
    assert data["run"]["backend"] == "cuda" and data["run"]["events"] == 8
    assert {c["category"]: c["total_bytes"] for c in data["categories"]} == \
        {"activation": 4608, "parameter": 1024, "temporary": 1024}
    assert data["fragmentation"]["inactive_split_bytes"] == 6_284_800
    assert data["modules"][0]["module"] == "m"


def test_report_flags_a_replay_that_disagrees(tmp_path, capsys):
    run = write_trace(tmp_path, CPU_EVENTS, max_allocated_bytes=5000)
    out = _report(run, capsys)
    assert "replay DIFFERS by -500 B" in out


def test_report_through_the_cli(cpu, capsys):
    from profiler.cli import main

    assert main(["report", str(cpu.path), "--top", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["peak"]["allocated_bytes"] == 14_500
    assert main(["report", str(cpu.path), "--top", "-3"]) == 2
