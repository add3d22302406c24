"""Analysis on hand-built traces whose right answers are worked out by hand, in exact bytes.

Allocated bytes drop at free_requested, active bytes at free_completed. The runs
(CPU_EVENTS, CUDA_EVENTS) and their expected counters are in analysis_runs.py;
fragmentation is tested in test_analysis_fragmentation.py, summaries, comparisons and
the report verb in test_analysis_summary.py.
"""

from __future__ import annotations

import random

import numpy as np
import pandas as pd
import pytest
from analysis_runs import (
    CPU_ACTIVE,
    CPU_ALLOCATED,
    CPU_BASELINE,
    CPU_EVENTS,
    CUDA_ACTIVE,
    CUDA_ALLOCATED,
    CUDA_RESERVED,  # noqa: F401
    S1,
    S2,
    S3,
    SEG,
    freed,
    load,
)
from fakes import write_trace

from profiler.analysis import (
    alive_at_peak,
    breakdown,
    category_at_peak,
    category_peaks,
    category_timeline,
    downsample,
    lifetimes,
    live_at,
    memory_timeline,
    module_table,
    peak,
    phase_spans,
    rollup,
    step_spans,
)
from profiler.analysis.categories import category_names
from profiler.analysis.live import pair_frees
from profiler.analysis.timeline import ALLOC, FREE_COMPLETED, FREE_REQUESTED, OTHER_KIND, Peak


# -- timeline ---------------------------------------------------------------------------
def test_cpu_counters(cpu):
    tl = memory_timeline(cpu)
    assert tl["allocated_bytes"].tolist() == CPU_ALLOCATED
    assert tl["active_bytes"].tolist() == CPU_ACTIVE
    assert tl["allocated_bytes"].dtype == np.int64
    assert tl["event_index"].tolist() == list(range(13))
    assert tl["reserved_bytes"].isna().all()  # CPU: null, never zero
    p = peak(cpu)
    assert p == Peak(event_index=5, ts_us=1_050, step=0, phase="backward", allocated_bytes=14_500)
    assert p.allocated_bytes == cpu.meta["max_allocated_bytes"] == max(CPU_ALLOCATED)


def test_cuda_counters_differ_while_frees_are_pending(cuda):
    tl = memory_timeline(cuda)
    assert tl["allocated_bytes"].tolist() == CUDA_ALLOCATED
    assert tl["active_bytes"].tolist() == CUDA_ACTIVE
    assert tl["reserved_bytes"].tolist() == CUDA_RESERVED
    # Pending: S2's 512 from before capture until event 3; S1+0x800 over 4..6; S3's 4096 over 6..8.
    pending = (tl["active_bytes"] - tl["allocated_bytes"]).tolist()
    assert pending == [512, 512, 512, 0, 512, 512, 4608, 4096, 4096, 0, 0]
    assert peak(cuda) == Peak(5, 1_050, 1, "backward", 6656)
    assert peak(cuda).allocated_bytes == cuda.meta["max_allocated_bytes"]


def test_traces_without_free_requested_fall_back_to_free_completed(tmp_path):
    events = [
        ("alloc", 0x1, 1000, "forward", "a"),
        ("alloc", 0x2, 200, "forward", "a"),
        ("free_completed", 0x2, 200, "forward", "a"),
        ("free_completed", 0x1, 1000, "backward", "a"),
    ]
    tl = memory_timeline(load(write_trace(tmp_path / "cpu", events)))
    assert tl["allocated_bytes"].tolist() == tl["active_bytes"].tolist() == [1000, 1200, 1000, 0]
    # A block pending free at the start was never allocated: its completion lowers active only.
    segs = [
        dict(
            snapshot="start",
            ts_us=990,
            event_index=0,
            segment_addr=S1,
            segment_bytes=SEG,
            stream=0,
            segment_type="small",
            is_expandable=False,
            block_addr=a,
            block_bytes=b,
            requested_bytes=b,
            state=st,
        )
        for a, b, st in (
            (S1, 512, "active_pending_free"),
            (S1 + 0x200, 1024, "active_allocated"),
            (S1 + 0x600, SEG - 0x600, "inactive"),
        )
    ]
    events = [
        ("alloc", S1 + 0x600, 512, "forward", "m"),
        ("free_completed", S1, 512, "forward", "m"),
        ("free_completed", S1 + 0x200, 1024, "forward", "m"),
        ("free_completed", S1 + 0x600, 512, "forward", "m"),
    ]
    t = load(
        write_trace(
            tmp_path / "cuda",
            events,
            segments=segs,
            backend="cuda",
            baseline_allocated_bytes=1024,
            max_allocated_bytes=1536,
        )
    )
    tl = memory_timeline(t)
    assert tl["allocated_bytes"].tolist() == [1536, 1536, 512, 0]
    assert tl["active_bytes"].tolist() == [2048, 1536, 512, 0]
    assert live_at(t, 0)["addr"].tolist() == [S1 + 0x200, S1 + 0x600]
    assert live_at(t, 0, active=True)["size_bytes"].sum() == 2048


def test_peak_before_the_first_event(tmp_path):
    events = [*freed(0x10, 100, "forward", "a"), ("alloc", 0x20, 50, "backward", "a")]
    t = load(write_trace(tmp_path, events, baseline_allocated_bytes=1000))
    assert peak(t) == Peak(-1, None, None, None, 1000)
    assert live_at(t, -1)["size_bytes"].sum() == 1000


def test_downsample_keeps_the_global_max_and_min():
    rng = np.random.default_rng(7)
    values = np.cumsum(rng.integers(-1000, 1001, 200_001)).astype(np.int64)  # buckets of unequal width
    top, bottom = int(np.argmax(values)), int(np.argmin(values))
    reserved = pd.array(values + 5, dtype="Int64")
    reserved[:10] = pd.NA
    df = pd.DataFrame({"event_index": np.arange(len(values)), "allocated_bytes": values, "reserved_bytes": reserved})
    out = downsample(df, 200, ["allocated_bytes", "reserved_bytes"])
    assert len(out) <= 200
    assert top in set(out["event_index"]) and bottom in set(out["event_index"])
    assert out["allocated_bytes"].max() == values.max()
    assert out["event_index"].is_monotonic_increasing
    assert out["event_index"].iloc[0] == 0 and out["event_index"].iloc[-1] == len(values) - 1
    assert downsample(df.head(50), 200, ["allocated_bytes"]).equals(df.head(50))


def test_timeline_downsampled_before_the_frame_is_built(tmp_path):
    events = [("alloc", 0x1000 + i, 512 * (i % 7 + 1), "forward" if i < 150 else "backward", "m") for i in range(300)]
    events += [e for i in range(300) for e in freed(0x1000 + i, 512 * (i % 7 + 1), "backward", "m")]
    t = load(write_trace(tmp_path, events))
    small = memory_timeline(t, max_points=30)
    assert len(small) <= 30
    assert small["allocated_bytes"].max() == t.meta["max_allocated_bytes"] == peak(t).allocated_bytes
    full = memory_timeline(t).set_index("event_index")
    assert small.set_index("event_index")["allocated_bytes"].equals(full.loc[small["event_index"], "allocated_bytes"])


def test_block_bytes_win_over_requested_sizes(cpu):
    # The allocator counts rounded blocks; a trace that records them is replayed in blocks.
    cpu.events["block_bytes"] = cpu.events["size_bytes"].astype("float64") + 24
    assert memory_timeline(cpu)["allocated_bytes"].tolist() == [
        11_024,
        11_248,
        11_024,
        11_024,
        14_048,
        14_572,
        11_548,
        11_548,
        10_524,
        10_524,
        11_248,
        10_524,
        10_524,
    ]
    live = alive_at_peak(cpu)
    assert live["size_bytes"].sum() == 14_572
    assert live.dropna(subset=["addr"])["requested_bytes"].tolist() == [1000, 3000, 500]


def test_step_and_phase_spans(cuda, cpu):
    steps = step_spans(cuda)
    assert steps[
        ["step", "event_index_start", "event_index_end", "peak_allocated_bytes", "peak_active_bytes"]
    ].values.tolist() == [[0, 0, 4, 6144, 6656], [1, 5, 10, 6656, 7680]]
    # No phases table: first and last event of each (step, phase).
    spans = phase_spans(cuda)
    assert spans[["step", "phase", "event_index_start", "event_index_end"]].values.tolist() == [
        [0, "forward", 0, 3],
        [0, "backward", 4, 4],
        [1, "backward", 5, 10],
    ]
    assert phase_spans(cpu)["phase"].tolist() == ["forward", "backward", "optimizer"]


def test_phase_spans_from_the_phases_table(tmp_path):
    phases = [
        dict(step=0, phase="forward", ts_us_start=1_000, ts_us_end=1_035),
        dict(step=0, phase="backward", ts_us_start=1_036, ts_us_end=1_070),
    ]
    t = load(write_trace(tmp_path, CPU_EVENTS, phases=phases))
    spans = phase_spans(t)
    assert spans[["phase", "event_index_start", "event_index_end"]].values.tolist() == [
        ["forward", 0, 3],
        ["backward", 4, 7],
    ]


# -- live -------------------------------------------------------------------------------
def test_live_at_peak_holds_exactly_the_allocated_bytes(cpu):
    live = alive_at_peak(cpu)
    known = live[live["addr"].notna()]
    assert known[["addr", "size_bytes", "module", "phase", "category", "alloc_index", "state"]].values.tolist() == [
        [0x1000, 1000, "l1", "forward", "activation", 0, "active_allocated"],
        [0x3000, 3000, "l2", "forward", "activation", 4, "active_allocated"],
        [0x4000, 500, "l2", "backward", "gradient", 5, "active_allocated"],
    ]
    # The 10,000 bytes that pre-date a CPU capture have no block: one unattributed row.
    assert live["size_bytes"].sum() == 14_500
    assert live.loc[live["addr"].isna(), "size_bytes"].tolist() == [CPU_BASELINE]
    assert live.loc[live["addr"].isna(), "state"].tolist() == [None]


def test_live_at_allocated_and_active_sets(cpu, cuda):
    assert live_at(cpu, 2)["addr"].dropna().tolist() == [0x1000]  # 0x2000's free was requested ...
    pending = live_at(cpu, 2, active=True).dropna(subset=["addr"])  # ... and completes at event 3
    assert pending[["addr", "state"]].values.tolist() == [[0x1000, "active_allocated"], [0x2000, "active_pending_free"]]
    assert live_at(cpu, 12)["size_bytes"].sum() == 10_500
    with pytest.raises(ValueError):
        live_at(cpu, 13)
    cols = ["addr", "size_bytes", "category", "alloc_index", "state"]
    # Baseline blocks are alive until their own free; they carry their category.
    assert live_at(cuda, 2)[cols].values.tolist() == [
        [S1, 1024, "parameter", -1, "active_allocated"],
        [S1 + 0x800, 512, "other", -1, "active_allocated"],
        [S1 + 0x400, 512, "activation", 0, "active_allocated"],
        [S3, 4096, "activation", 2, "active_allocated"],
    ]
    active = live_at(cuda, 2, active=True)
    assert active[cols].values.tolist()[2] == [S2, 512, None, -1, "active_pending_free"]  # since before capture
    assert active["size_bytes"].sum() == CUDA_ACTIVE[2] and active["addr"].notna().all()
    at_peak = live_at(cuda, 5, active=True).set_index("addr")
    assert at_peak.loc[S1 + 0x800, "state"] == "active_pending_free"  # requested at 4, completed at 7
    assert at_peak["size_bytes"].sum() == 7168 and live_at(cuda, 5)["size_bytes"].sum() == 6656
    assert live_at(cuda, 6, active=True).set_index("addr").loc[S3, "state"] == "active_pending_free"
    assert S1 + 0x800 not in set(live_at(cuda, 7, active=True)["addr"])
    assert (live_at(cuda, -1)["size_bytes"].sum(), live_at(cuda, -1, active=True)["size_bytes"].sum()) == (1536, 2048)


def test_lifetimes(cuda):
    lt = lifetimes(cuda)
    assert lt.alloc_index.tolist() == [0, 2, 5, 8]
    assert lt.release_index.tolist() == [11, 6, 11, 11]  # 11: never
    assert lt.end_index.tolist() == [11, 9, 11, 11]
    base = lt.baseline
    assert base["addr"].tolist() == [S1, S1 + 0x800, S2]
    assert base["pending_at_start"].tolist() == [False, False, True]
    assert base["release_index"].tolist() == [11, 4, -1]
    assert base["end_index"].tolist() == [11, 7, 3]


def test_pair_frees_on_unusual_streams():
    kinds, addr = zip(
        *[
            (OTHER_KIND, 100),  # 0  a segment event at a block's address: never paired
            (ALLOC, 100),
            (FREE_REQUESTED, 100),
            (FREE_REQUESTED, 100),
            (FREE_COMPLETED, 100),  # 1-4  a double request
            (FREE_COMPLETED, 200),  # 5  frees with no alloc before them end blocks older than the capture
            (FREE_REQUESTED, 300),  # 6
            (ALLOC, 300),
            (ALLOC, 300),  # 7, 8  the free of 7 was dropped
            (FREE_COMPLETED, 300),  # 9  belongs to 8, which had no request
            (FREE_REQUESTED, 200),  # 10
        ]
    )
    p = pair_frees(np.array(kinds, np.int8), np.array(addr, np.int64))
    assert p.alloc_index.tolist() == [1, 7, 8]
    assert p.request_index.tolist() == [2, 11, 11]
    assert p.complete_index.tolist() == [4, 11, 9]
    assert p.orphan_addr.tolist() == [200, 300]
    assert p.orphan_request.tolist() == [10, 6]
    assert p.orphan_complete.tolist() == [5, 11]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_counters_and_live_sets_match_a_plain_replay(tmp_path, seed):
    """Random streams, frees completed 0-6 events after their request, against a Python loop."""
    rng = random.Random(seed)
    free_addrs, live, pending, events = [0x100 * i for i in range(1, 30)], {}, [], []
    while len(events) < 400:
        for due in [d for d in pending if d[0] <= len(events)]:
            pending.remove(due)
            events.append(("free_completed", due[1], due[2], "forward", "m"))
            free_addrs.append(due[1])
        if free_addrs and (rng.random() < 0.5 or not live):
            a = free_addrs.pop(rng.randrange(len(free_addrs)))
            live[a] = rng.choice([512, 1024, 4096, 8192])
            events.append(("alloc", a, live[a], "forward", rng.choice(["m", "n"])))
        elif live:
            a = rng.choice(sorted(live))
            events.append(("free_requested", a, live[a], "forward", "m"))
            pending.append((len(events) + rng.randint(0, 6), a, live.pop(a)))
    t = load(write_trace(tmp_path, events, baseline_allocated_bytes=100))
    lt = lifetimes(t)
    allocated, active, want_alloc, want_active = {}, {}, [], []
    for i, (action, a, size, *_rest) in enumerate(events):
        if action == "alloc":
            allocated[a] = active[a] = size
        elif action == "free_requested":
            del allocated[a]
        else:
            del active[a]
        want_alloc.append(100 + sum(allocated.values()))
        want_active.append(100 + sum(active.values()))
        if i % 37 == 0:
            assert set(live_at(t, i, lt)["addr"].dropna()) == set(allocated), i
            assert set(live_at(t, i, lt, active=True)["addr"].dropna()) == set(active), i
    tl = memory_timeline(t)
    assert tl["allocated_bytes"].tolist() == want_alloc
    assert tl["active_bytes"].tolist() == want_active


def test_breakdowns(cpu):
    live = alive_at_peak(cpu)
    by_module = breakdown(live, "module")
    assert by_module[["module", "total_bytes", "count"]].values.tolist() == [
        [None, 10_000, 0],
        ["l2", 3500, 2],
        ["l1", 1000, 1],
    ]
    assert by_module["share"].tolist() == pytest.approx([10_000 / 14_500, 3500 / 14_500, 1000 / 14_500])
    by_both = breakdown(live, ["module", "category"])
    assert by_both.iloc[1][["module", "category", "total_bytes"]].tolist() == ["l2", "activation", 3000]
    assert breakdown(live, "stack_id")["total_bytes"].sum() == 14_500


# -- modules ----------------------------------------------------------------------------
def test_module_table(cpu):
    table = module_table(cpu).set_index("module")
    cols = ["forward_alloc_bytes", "backward_alloc_bytes", "retained_bytes", "peak_contribution_bytes", "param_bytes"]
    assert table.loc["l1", cols].tolist() == [1200, 0, 1000, 1000, 4096]
    assert table.loc["l2", cols].tolist() == [3000, 500, 3000, 3500, 8192]
    assert table.loc["l2", "class_name"] == "Linear" and table.loc["l2", "depth"] == 1
    assert table.index[0] == "l2"  # sorted by contribution to the peak


def test_modules_stop_holding_bytes_when_their_free_is_requested(tmp_path):
    events = [
        ("alloc", 0x100, 100, "forward", "a"),  # 0
        ("alloc", 0x200, 60, "forward", "b"),  # 1
        ("free_requested", 0x100, 100, "forward", "a"),  # 2  a's block: no longer allocated ...
        ("alloc", 0x300, 120, "backward", "b"),  # 3  the peak: 180 allocated, 280 active
        ("free_completed", 0x100, 100, "backward", "a"),  # 4  ... nor active
        *freed(0x200, 60, "backward", "b"),
        *freed(0x300, 120, "backward", "b"),
    ]
    t = load(write_trace(tmp_path, events, max_allocated_bytes=180))
    assert peak(t).event_index == 3 and peak(t).allocated_bytes == 180
    table = module_table(t).set_index("module")
    cols = ["forward_alloc_bytes", "backward_alloc_bytes", "retained_bytes", "peak_contribution_bytes"]
    assert table.loc["a", cols].tolist() == [100, 0, 0, 0]  # freed (requested) inside its forward span
    assert table.loc["b", cols].tolist() == [60, 120, 60, 180]
    assert alive_at_peak(t, active=True)["size_bytes"].sum() == 280


def test_module_table_recompute_and_unknown_modules(tmp_path):
    events = [
        ("alloc", 0x10, 100, "forward", "blocks.0.mlp"),
        ("alloc", 0x20, 40, "recompute", "blocks.0.mlp"),
        *freed(0x20, 40, "backward", "blocks.0.mlp"),
        ("alloc", 0x30, 60, "backward", "blocks.0"),
    ]
    mods = [
        dict(
            module="blocks", parent=None, class_name="ModuleList", depth=0, param_bytes=0, buffer_bytes=0, param_count=0
        )
    ]
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
        for lt in (None, lifetimes(trace)):
            tl = category_timeline(trace, lt=lt)
            assert (tl[category_names()].sum(axis=1) == tl["allocated_bytes"]).all()
    tl = category_timeline(cuda).set_index("event_index")
    cols = ["parameter", "activation", "temporary", "other"]
    # Baseline blocks count in their category from the start; S1+0x800 leaves "other" at its request (4).
    assert tl.loc[0, cols].tolist() == [1024, 512, 0, 512]
    assert tl.loc[3, cols].tolist() == [1024, 4608, 0, 512]
    assert tl.loc[4, cols].tolist() == [1024, 4608, 0, 0]
    assert tl.loc[5, cols].tolist() == [1024, 4608, 1024, 0]
    assert tl.loc[8, cols].tolist() == [1024, 512, 2048, 0]


def test_category_timeline_downsampled_keeps_the_peak(tmp_path):
    events = [("alloc", 0x1000 + i, 100 + i, "forward" if i % 2 else "backward", "m") for i in range(300)]
    events += [e for i in range(300) for e in freed(0x1000 + i, 100 + i, "backward", "m")]
    t = load(write_trace(tmp_path, events))
    tl = category_timeline(t, max_points=40)
    assert len(tl) <= 40
    assert tl["allocated_bytes"].max() == t.meta["max_allocated_bytes"]
    assert (tl[category_names()].sum(axis=1) == tl["allocated_bytes"]).all()
    full = category_timeline(t, max_points=10_000).set_index("event_index")
    assert tl.set_index("event_index").equals(full.loc[tl["event_index"]])


def test_category_at_peak(cpu, cuda):
    at_peak = category_at_peak(cpu).set_index("category")
    assert at_peak.loc["other", "total_bytes"] == CPU_BASELINE  # pre-capture bytes have no category
    assert at_peak.loc["activation", ["total_bytes", "count"]].tolist() == [4000, 2]
    assert at_peak.loc["gradient", "total_bytes"] == 500
    assert at_peak["total_bytes"].sum() == 14_500
    assert set(at_peak.index) >= set(category_names())
    gpu = category_at_peak(cuda).set_index("category")["total_bytes"]
    assert (gpu["parameter"], gpu["activation"], gpu["temporary"], gpu["other"], gpu.sum()) == (
        1024,
        4608,
        1024,
        0,
        6656,
    )


def test_category_peaks(cpu, cuda):
    def peaks(trace):
        df = category_peaks(trace).set_index("category")
        return {c: tuple(r) for c, r in df[["peak_bytes", "event_index"]].iterrows() if r["peak_bytes"]}

    assert peaks(cpu) == {"activation": (4000, 4), "temporary": (700, 10), "gradient": (500, 5), "other": (10_000, -1)}
    assert peaks(cuda) == {"parameter": (1024, -1), "other": (512, -1), "activation": (4608, 2), "temporary": (2048, 8)}
