"""Fragmentation: the allocator's address space replayed over the hand-built runs of analysis_runs.py.

Blocks whose free was requested but not completed still occupy their space (state
active_pending_free); free space is what no such block covers.
"""

from __future__ import annotations

import pytest
from analysis_runs import S1, S2, S3, SEG, cpu, cuda, load  # noqa: F401
from fakes import write_trace

from profiler.analysis import allocator_counters, fragmentation, fragmentation_at_peak, memory_timeline, segment_map_at


# -- fragmentation ----------------------------------------------------------------------
def test_segment_map_at_the_start(cuda):
    seg = segment_map_at(cuda, -1)
    assert seg[["segment_addr", "block_addr", "size_bytes", "state"]].values.tolist() == [
        [S1, S1, 1024, "active_allocated"],
        [S1, S1 + 0x400, 1024, "inactive"],
        [S1, S1 + 0x800, 512, "active_allocated"],
        [S1, S1 + 0xA00, SEG - 0xA00, "inactive"],
        [S2, S2, 512, "active_pending_free"],
        [S2, S2 + 0x200, SEG - 0x200, "inactive"],
    ]
    assert seg["category"].tolist()[0] == "parameter"
    assert set(seg["segment_bytes"]) == {SEG}


def test_segment_map_coalesces_free_space(cuda):
    cols = ["segment_addr", "block_addr", "size_bytes", "state"]
    # The peak: S1+0x800's free was requested, but its block still holds the space until completed.
    assert segment_map_at(cuda, 5)[cols].values.tolist() == [
        [S1, S1, 1024, "active_allocated"],
        [S1, S1 + 0x400, 512, "active_allocated"],
        [S1, S1 + 0x600, 512, "inactive"],
        [S1, S1 + 0x800, 512, "active_pending_free"],
        [S1, S1 + 0xA00, SEG - 0xA00, "inactive"],
        [S2, S2, 1024, "active_allocated"],
        [S2, S2 + 0x400, SEG - 0x400, "inactive"],
        [S3, S3, 4096, "active_allocated"],
        [S3, S3 + 0x1000, SEG - 0x1000, "inactive"],
    ]
    # Completed: the freed block joins the free space around it.
    assert segment_map_at(cuda, 7).query("segment_addr == @S1")[cols].values.tolist() == [
        [S1, S1, 1024, "active_allocated"],
        [S1, S1 + 0x400, 512, "active_allocated"],
        [S1, S1 + 0x600, SEG - 0x600, "inactive"],
    ]
    assert segment_map_at(cuda, 6).query("block_addr == @S3")["state"].tolist() == ["active_pending_free"]


def test_fragmentation_at_step_boundaries_and_peak(cuda):
    frag = fragmentation(cuda)
    assert frag["point"].tolist() == ["step_end", "peak", "step_end"]
    cols = [
        "event_index",
        "reserved_bytes",
        "allocated_bytes",
        "active_bytes",
        "reserved_minus_allocated_bytes",
        "inactive_split_bytes",
        "largest_free_block_bytes",
    ]
    assert frag[cols].values.tolist() == [
        # S2 is wholly free: not a split, but the largest free block.
        [4, 3 * SEG, 5632, 6144, 3 * SEG - 5632, (SEG - 2048) + (SEG - 4096), SEG],
        [5, 3 * SEG, 6656, 7168, 3 * SEG - 6656, (SEG - 2048) + (SEG - 1024) + (SEG - 4096), SEG - 1024],
        [10, 2 * SEG, 3584, 3584, 2 * SEG - 3584, (SEG - 1536) + (SEG - 2048), SEG - 1536],
    ]
    assert frag["fragmentation_ratio"].tolist() == pytest.approx(
        [(3 * SEG - 5632) / (3 * SEG), (3 * SEG - 6656) / (3 * SEG), (2 * SEG - 3584) / (2 * SEG)]
    )
    at_peak = fragmentation_at_peak(cuda)
    assert at_peak["inactive_split_bytes"] == 6_284_288 and at_peak["largest_free_block_bytes"] == 2_096_128
    assert (at_peak["allocated_bytes"], at_peak["active_bytes"]) == (6656, 7168)
    every = fragmentation(cuda, every_n_events=2)
    assert every.loc[every["point"] == "every_n", "event_index"].tolist() == [1, 3, 5, 7, 9]


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
        [base, base, 2 * mib, "active_allocated"],
        [base, base + 2 * mib, 4 * mib, "active_allocated"],
        [base, base + 6 * mib, 34 * mib, "inactive"],
    ]
    assert set(segment_map_at(t, 4)["segment_bytes"]) == {30 * mib}
    row = fragmentation(t).iloc[-1]
    assert (row["reserved_bytes"], row["largest_free_block_bytes"]) == (30 * mib, 24 * mib)


def test_allocator_counters_are_the_steps_table(cpu):
    counters = allocator_counters(cpu)
    assert counters["step"].tolist() == [0, 1, 2]
    assert counters["max_allocated_bytes"].tolist() == [14_500] * 3
    assert "num_alloc_retries" in counters and "inactive_split_bytes" in counters
