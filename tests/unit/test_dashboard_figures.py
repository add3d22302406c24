"""The dashboard's figure builders, without Streamlit: the traces are there and the numbers are
the analysis functions' own (the peak point is the analysis peak, stacks sum to it)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("plotly")
pytest.importorskip("streamlit")

from dashboard import figures  # noqa: E402
from profiler import analysis  # noqa: E402
from profiler.analysis.categories import category_names  # noqa: E402
from profiler.analysis.kv import kv_table, kv_token_bytes, kv_waste  # noqa: E402
from profiler.analysis.ranks import step_aligned  # noqa: E402
from profiler.analysis.slack import SLACK_NAMES  # noqa: E402
from profiler.analysis.stacks import stack_tree  # noqa: E402
from profiler.trace.reader import load_trace  # noqa: E402

TRACES = Path(__file__).resolve().parents[2] / "traces"
RUN = TRACES / "gpt2-small-bf16-h100"
KV_RUNS = sorted((TRACES / "h100-ablation-kv").glob("ablate-kv-kv-*"))


@pytest.fixture(scope="module")
def loaded():
    trace = load_trace(RUN)
    return trace, analysis.lifetimes(trace)


def _named(fig, name):
    found = [t for t in fig.data if t.name == name]
    assert found, f"no trace {name!r} in {[t.name for t in fig.data]}"
    return found[0]


def test_memory_timeline_has_series_and_the_analysis_peak(loaded):
    trace, lt = loaded
    p = analysis.peak(trace, lt)
    tl = analysis.memory_timeline(trace, lt, max_points=500)
    fig = figures.memory_timeline(tl, p, analysis.step_spans(trace, lt), analysis.phase_spans(trace), marker=10)
    for name in ("allocated", "active", "reserved"):
        assert _named(fig, name).type == "scattergl"
    star = _named(fig, "peak")
    assert list(star.x) == [p.event_index]
    assert list(star.customdata[0]) == [p.allocated_bytes, p.event_index]
    # Downsampling kept the peak: the drawn line reaches it exactly, in the figure's unit.
    assert fig.layout.meta["byte_unit"] == "GiB" == fig.layout.yaxis.title.text
    assert round(max(_named(fig, "allocated").y) * _unit(fig)) == p.allocated_bytes
    assert fig.layout.shapes  # step lines, phase bands and the marker
    assert {"forward phase", "backward phase"} <= {t.name for t in fig.data}  # the bands' legend
    assert fig.layout.xaxis.title.text == "event number"


def _unit(fig) -> float:
    return fig.layout.meta["bytes_per_unit"]


def test_time_axes_and_byte_units_follow_the_data(loaded):
    """Seconds from the events' times, steps from their spans (whole-number ticks); a small run in MiB."""
    from dashboard import data

    trace, lt = loaded
    p = analysis.peak(trace, lt)
    spans = analysis.step_spans(trace, lt)
    tl = analysis.memory_timeline(trace, lt, max_points=500)
    seconds = figures.memory_timeline(tl, p, spans, x_of=data.event_axis(trace, spans, "seconds"), axis="seconds")
    ts = trace.events["ts_us"].to_numpy()
    assert _named(seconds, "peak").x[0] == pytest.approx((ts[p.event_index] - ts[0]) / 1e6)
    assert seconds.layout.xaxis.title.text == "seconds since capture began"
    steps = figures.memory_timeline(tl, p, spans, x_of=data.event_axis(trace, spans, "steps"), axis="steps")
    assert int(_named(steps, "peak").x[0]) == p.step and steps.layout.xaxis.dtick == 1
    small = tl.assign(allocated_bytes=tl["allocated_bytes"] // 400, active_bytes=tl["active_bytes"] // 400)
    fig = figures.memory_timeline(small.drop(columns=["reserved_bytes"]))
    assert fig.layout.yaxis.title.text == "MiB" and _unit(fig) == 2**20


def test_breakdown_at_the_peak_sums_to_the_peak(loaded):
    trace, lt = loaded
    live = analysis.alive_at_peak(trace, lt)
    for by in ("module", "category", "stack_id"):
        fig = figures.breakdown_bar(analysis.breakdown(live, by), by, top=10_000)
        assert sum(fig.data[0].customdata[:, 0]) == analysis.peak(trace, lt).allocated_bytes
    from profiler.analysis.stacks import site_breakdown

    sites = figures.breakdown_bar(site_breakdown(live, trace.stacks, trace.frames), "site", top=10_000)
    assert sum(sites.data[0].customdata[:, 0]) == analysis.peak(trace, lt).allocated_bytes
    assert "model.py:168 forward > functional.py:3504 cross_entropy" in sites.data[0].y  # file:line labels


def test_allocator_counters(loaded):
    trace, _ = loaded
    fig = figures.allocator_counters(analysis.allocator_counters(trace))
    assert {"allocated", "reserved"} <= {t.name for t in fig.data}
    assert fig.layout.xaxis.dtick == 1  # whole steps


def test_module_bar_and_tree(loaded):
    trace, lt = loaded
    from profiler.analysis.modules import module_parts, no_module_at_peak

    table = analysis.module_table(trace, lt=lt)
    parts = module_parts(analysis.rollup(table), "peak_contribution_bytes", no_module_at_peak(trace, lt))
    # The roots (the model and the bytes in no module) add up to the peak; the root's own bytes are a box.
    assert parts.loc[parts["parent"] == "", "bytes"].sum() == analysis.peak(trace, lt).allocated_bytes
    itself = parts[(parts["kind"] == "itself") & (parts["parent"] == "GPT")]
    assert itself["label"].tolist() == ["GPT.forward itself"]
    assert itself["bytes"].iloc[0] == table.loc[table["module"] == "GPT", "peak_contribution_bytes"].iloc[0]
    bar = figures.module_bar(parts, "peak_contribution_bytes", top=5)
    assert max(bar.data[0].customdata) == itself["bytes"].iloc[0]
    assert "GPT.forward itself" in bar.data[0].y
    for kind, cls in (("treemap", "treemap"), ("icicle", "icicle")):
        tree = figures.module_tree(parts, "peak_contribution_bytes", kind)
        assert tree.data[0].type == cls
        assert len(tree.data[0].ids) == len(set(tree.data[0].ids)) > 1


def test_categories_sum_to_allocated_and_to_the_peak(loaded):
    trace, lt = loaded
    ct = analysis.category_timeline(trace, max_points=400, lt=lt)
    fig = figures.category_area(ct, category_names())
    stacked = sum(np.asarray(t.y) for t in fig.data) * _unit(fig)
    np.testing.assert_allclose(stacked, ct["allocated_bytes"].to_numpy(), rtol=0, atol=1)
    at_peak = analysis.category_at_peak(trace, lt)
    bar = figures.category_peak_bar(at_peak)
    assert sum(bar.data[0].customdata) == analysis.peak(trace, lt).allocated_bytes


def test_fragmentation_and_segment_map(loaded):
    trace, lt = loaded
    by_step = analysis.slack_by_step(trace, lt)
    fig = figures.slack_panels(by_step, SLACK_NAMES)
    assert [t.name for t in fig.data] == list(SLACK_NAMES.values())
    # Every step end, each panel on its own axis, read back in bytes equal to the allocator's counters.
    steps = trace.steps.sort_values("step")
    for t in fig.data:
        assert list(t.x) == steps["step"].tolist()
    # The hover's exact bytes are the counters; the drawn values are the same bytes in the axis unit.
    drawn = {t.name: np.asarray(t.customdata, dtype=float).astype("int64").tolist() for t in fig.data}
    for t in fig.data[:3]:
        np.testing.assert_allclose(np.asarray(t.y, dtype=float) * _unit(fig), t.customdata, rtol=1e-12)
    assert drawn["cached but free"] == (steps["reserved_bytes"] - steps["active_bytes"]).tolist()
    assert drawn["inactive split"] == steps["inactive_split_bytes"].tolist()
    assert list(fig.data[3].y) == steps["num_alloc_retries"].tolist()
    # No counter holds the largest free block; the allocator's own snapshot at the end of the run does.
    end = trace.segments[(trace.segments["snapshot"] == "end") & (trace.segments["state"] == "inactive")]
    assert drawn["largest free block"][-1] == int(end["block_bytes"].max())
    assert fig.layout.xaxis4.dtick == 1 and fig.layout.xaxis4.title.text == "step"
    cpu_like = by_step.assign(largest_free_block_bytes=pd.NA, num_alloc_retries=pd.NA)
    assert [t.name for t in figures.slack_panels(cpu_like, SLACK_NAMES).data] == ["cached but free", "inactive split"]
    p = analysis.peak(trace, lt)
    layout = analysis.segment_map_at(trace, p.event_index, lt)
    seg = figures.segment_map(layout, "state")
    drawn = sum(int(sum(t.customdata[:, 1])) for t in seg.data)
    assert drawn == analysis.fragmentation_at_peak(trace, lt)["reserved_bytes"]
    assert "inactive" in {t.name for t in seg.data}
    # A block's hover says what made it: the owners of the live blocks at that moment.
    from dashboard import data

    live = analysis.live_at(trace, p.event_index, lt)
    owned = figures.segment_map(data.blocks_with_owners(layout, live, trace.stacks, trace.frames), "state")
    allocated = next(t for t in owned.data if t.name == "active_allocated")
    rows = {int(r[0]): r for r in allocated.customdata}
    for block in live.dropna(subset=["addr"]).itertuples():
        row = rows.get(int(block.addr))
        if row is not None:
            assert row[3] == (block.module if isinstance(block.module, str) else "")
    assert "module: %{customdata[3]}" in allocated.hovertemplate
    assert any(str(r[5]).startswith("model.py:") for r in allocated.customdata)


def test_kv_growth_and_waste():
    kvs = {r.name: kv_table(load_trace(r, tables=("kv",))) for r in KV_RUNS}
    kvs = {name: kv for name, kv in kvs.items() if len(kv)}  # kv-none keeps no cache
    assert len(kvs) >= 2
    token_bytes = kv_token_bytes(next(iter(kvs.values())))
    fig = figures.kv_growth(kvs, token_bytes)
    assert _named(fig, "formula").line.dash == "dash"
    assert len(fig.data) == 2 * len(kvs) + 1
    waste = kv_waste(kvs)
    bars = figures.kv_waste(waste)
    assert [t.name for t in bars.data] == ["token states", "unused", "extra"]
    kv = next(iter(kvs.values()))
    assert (kv["token_state_bytes"] + kv["unused_bytes"] == kv["reserved_bytes"]).all()


def test_compare_figures(loaded):
    trace, lt = loaded
    tl = analysis.memory_timeline(trace, lt, max_points=300)
    x = step_aligned(tl, analysis.step_spans(trace, lt))
    assert np.all(np.diff(x[~np.isnan(x)]) >= 0)
    fig = figures.overlay_timelines({"a": tl.assign(x=x), "b": tl.assign(x=x)})
    assert [t.type for t in fig.data] == ["scattergl", "scattergl"]
    other = load_trace(KV_RUNS[0])
    diff = analysis.compare_categories(trace, other)
    bar = figures.diff_bar(diff, "category")
    assert set(bar.data[0].customdata) <= set(diff["delta_bytes"])


def test_stack_icicle_roots_sum_to_the_peak(loaded):
    trace, lt = loaded
    live = analysis.alive_at_peak(trace, lt)
    tree = stack_tree(live, trace.stacks, trace.frames, top=10_000)
    fig = figures.stack_icicle(tree)
    assert fig.data[0].type == "icicle"
    roots = tree[tree["parent"] == ""]
    assert int(roots["bytes"].sum()) == analysis.peak(trace, lt).allocated_bytes


@pytest.mark.parametrize(
    "build",
    [
        lambda: figures.memory_timeline(pd.DataFrame(columns=["event_index"])),
        lambda: figures.module_bar(pd.DataFrame(columns=["id", "parent", "label", "bytes", "kind"]), "x"),
        lambda: figures.kv_growth({}),
        lambda: figures.stack_icicle(pd.DataFrame(columns=["id", "parent", "label", "bytes"])),
        lambda: figures.diff_bar(pd.DataFrame({"k": [], "delta_bytes": []}), "k"),
    ],
)
def test_empty_inputs_give_an_annotated_figure(build):
    fig = build()
    assert not fig.data and fig.layout.annotations


def test_rank_figures(tmp_path):
    from rank_runs import write_job

    from profiler.analysis import ranks
    from profiler.trace import layout

    job = write_job(tmp_path, "job", {0: 2000, 1: 6000, 2: 3000}, world_size=4)
    table = layout.rank_table(job)
    bars = figures.rank_peaks(table, ranks.rank_skew(table))
    assert list(bars.data[0].x) == [0, 1, 2]  # the missing rank 3 has no bar
    assert list(bars.data[0].customdata[:, 0]) == [3500, 7500, 4500]
    assert list(bars.data[0].marker.color) == ["#1f77b4", "#d62728", "#1f77b4"]
    assert bars.layout.shapes[0].y0 * _unit(bars) == pytest.approx(4500)  # the median line
    assert bars.layout.yaxis.title.text == "KiB"
    cats = layout.rank_categories(job)
    stacked = figures.rank_categories(cats, category_names())
    assert sum(np.asarray(t.customdata) for t in stacked.data).tolist() == [3500, 7500, 4500]
    lines = figures.rank_timelines(layout.rank_timelines(job))
    assert [t.name for t in lines.data] == ["rank 0", "rank 1", "rank 2"]
    assert [max(t.customdata) for t in lines.data] == [3500, 7500, 4500]
    empty = table.iloc[0:0]
    assert not figures.rank_peaks(empty, ranks.rank_skew(empty)).data
    assert not figures.rank_timelines(layout.rank_timelines(job, ranks=[3])).data
