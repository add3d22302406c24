"""profiler.headlines: each page's sentences carry the analysis functions' own numbers, written as
`vramscope report` writes them."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from profiler import analysis, headlines
from profiler.analysis.compare import ablation_view, memory_saved_pct
from profiler.analysis.kv import kv_summary, kv_table, kv_waste
from profiler.analysis.modules import module_parts, no_module_at_peak
from profiler.analysis.stacks import NO_STACK, site_breakdown
from profiler.report import build_report
from profiler.trace.reader import load_trace
from profiler.trace.summary_cache import load_summary
from profiler.units import human_bytes

TRACES = Path(__file__).resolve().parents[2] / "traces"
RUN = TRACES / "gpt2-small-bf16-h100"
SEEDS = TRACES / "h100-ablation-seeds"


@pytest.fixture(scope="module")
def story():
    trace = load_trace(RUN)
    lt = analysis.lifetimes(trace)
    parts = module_parts(
        analysis.rollup(analysis.module_table(trace, lt=lt)), "peak_contribution_bytes", no_module_at_peak(trace, lt)
    )
    live = analysis.alive_at_peak(trace, lt)
    return (
        trace,
        analysis.peak(trace, lt),
        analysis.category_at_peak(trace, lt),
        parts,
        site_breakdown(live, trace.stacks, trace.frames),
    )


def test_overview_says_the_reports_peak_its_category_its_largest_part_and_line(story):
    trace, p, cats, parts, sites = story
    text = headlines.overview(p, cats, parts, sites)
    report = build_report(trace)
    assert text.startswith(
        f"Peak {human_bytes(report['peak']['allocated_bytes'])} allocated at step {p.step}, {p.phase}"
    )
    top = cats.iloc[0]
    assert f"{100 * top['total_bytes'] / p.allocated_bytes:.0f}% {top['category']}" in text
    itself = parts[parts["kind"] == "itself"].sort_values("bytes").iloc[-1]
    assert f"{itself['label']} ({human_bytes(int(itself['bytes']))})" in text
    site = sites[sites["site"] != NO_STACK].iloc[0]
    assert f"{site['site']} ({human_bytes(int(site['total_bytes']))})" in text
    missing = sites.loc[sites["site"] == NO_STACK, "total_bytes"].sum()
    assert f"{100 * missing / p.allocated_bytes:.0f}% of the peak's bytes have no stack" in text


def test_layers_names_the_bytes_in_no_module(story):
    _, p, _, parts, _ = story
    text = headlines.layers(parts, p.allocated_bytes)
    rest = parts.loc[parts["id"] == "(in no module)", "bytes"].iloc[0]
    assert f"{human_bytes(int(rest))} ({100 * rest / p.allocated_bytes:.0f}%) is in no module" in text


def test_categories_and_stacks(story):
    _, p, cats, _, sites = story
    assert f"{cats.iloc[0]['category']} {human_bytes(int(cats.iloc[0]['total_bytes']))}" in headlines.categories(
        cats, p.allocated_bytes
    )
    assert headlines.stacks(sites, p.allocated_bytes).startswith(sites[sites["site"] != NO_STACK].iloc[0]["site"])


def _seeds(*names):
    runs = [next(SEEDS.glob(f"ablate-seeds-{n}-2*")) for n in names]
    return runs, [load_summary(r) for r in runs]


def test_compare_names_the_best_option_by_reserved_memory_with_speed_and_loss():
    runs, summaries = _seeds("baseline", "bf16", "ckpt-full")
    losses = pd.DataFrame({"run": [r.name for r in runs], "loss": [2.0, 2.0, 2.0]})
    view = ablation_view(summaries, 0, losses, runs)
    text = headlines.compare(view, summaries, 0, 0.01)
    saved = {
        i: memory_saved_pct(summaries[0]["peak_reserved_bytes"], s["peak_reserved_bytes"])
        for i, s in enumerate(summaries)
    }
    best = max((1, 2), key=saved.get)
    assert text.startswith(f"Best option: {view['name'].iloc[best]} saves")
    base, run = summaries[0], summaries[best]
    assert human_bytes(base["peak_reserved_bytes"] - run["peak_reserved_bytes"]) + " reserved" in text
    assert human_bytes(base["peak_allocated_bytes"] - run["peak_allocated_bytes"]) + " allocated" in text
    assert f"{view['speed_change_pct'].iloc[best]:+.1f}% speed" in text and "loss is within 0.01" in text
    # An option whose loss moved is no option.
    moved = pd.DataFrame({"run": [r.name for r in runs], "loss": [2.0, 2.0, 2.0]})
    moved.loc[best, "loss"] = 3.0
    other = headlines.compare(ablation_view(summaries, 0, moved, runs), summaries, 0, 0.01)
    assert view["name"].iloc[best] not in other.split(" saves")[0]


def test_compare_warns_when_runs_differ_in_kind_and_names_what_no_option_changed():
    runs, summaries = _seeds("baseline", "bf16")
    assert headlines.kind_warning(["a", "b"], summaries) is None
    kv = next((TRACES / "h100-ablation-kv").glob("ablate-kv-baseline-*"))
    warning = headlines.kind_warning(["train", "serve"], [summaries[0], load_summary(kv)])
    assert "training (train)" in warning and "inference (serve)" in warning
    sites = [
        pd.DataFrame({"site": ["a.py:1 f", "b.py:2 g"], "total_bytes": [3 << 20, 5 << 20]}),
        pd.DataFrame({"site": ["a.py:1 f", "b.py:2 g"], "total_bytes": [3 << 20, 1 << 20]}),
    ]
    assert headlines.unchanged(["x", "y"], sites) == (
        "No option changed 3.00 MiB at the peak, the same in all 2 runs: a.py:1 f (3.00 MiB)."
    )


def test_kv_says_bytes_per_token_and_the_most_waste():
    runs = sorted((TRACES / "h100-ablation-kv").glob("ablate-kv-kv-*"))
    kvs = {r.name: kv_table(load_trace(r, tables=("kv",))) for r in runs}
    kvs = {k: v for k, v in kvs.items() if len(v)}
    waste = kv_waste(kvs)
    text = headlines.kv({k: kv_summary(v) for k, v in kvs.items()}, waste)
    per_token = [b for v in kvs.values() for b in kv_summary(v)["bytes_per_token"].dropna()]
    assert f"Bytes per token position: {human_bytes(round(max(per_token)))}" in text
    lost = waste["unused_bytes"] + waste["extra_bytes"]
    assert f"holds {human_bytes(round(lost.max()))} for no token" in text


def test_ranks_states_the_skew():
    skew = {"max_rank": 1, "min_rank": 0, "max_bytes": 7500, "min_bytes": 3500, "skew_pct": 36.4, "spread_bytes": 4000}
    text = headlines.ranks(skew, 2)
    assert "Rank 1 peaks highest at 7.32 KiB" in text and "+36.4% against the median of 2 ranks" in text


def test_peak_only_module_table_has_the_full_tables_peak_contributions(story):
    trace = story[0]
    lt = analysis.lifetimes(trace)
    full = analysis.module_table(trace, lt=lt).set_index("module").sort_index()
    quick = analysis.module_table(trace, lt=lt, peak_only=True).set_index("module").sort_index()
    assert quick.index.tolist() == full.index.tolist()
    assert (quick["peak_contribution_bytes"] == full["peak_contribution_bytes"]).all()
    assert (quick["param_bytes"] == full["param_bytes"]).all() and (quick["forward_alloc_bytes"] == 0).all()


def test_compare_without_a_reserved_saving_names_the_allocated_one_and_what_it_reserves():
    runs = sorted((TRACES / "h100-ablation-kv").glob("ablate-kv-*"))
    base, int8 = (next(r for r in runs if r.name.startswith(p)) for p in ("ablate-kv-baseline", "ablate-kv-kv-int8"))
    summaries = [load_summary(base), load_summary(int8)]
    assert summaries[1]["peak_reserved_bytes"] > summaries[0]["peak_reserved_bytes"]  # the case under test
    view = ablation_view(summaries, 0, pd.DataFrame({"run": [], "loss": []}), [base, int8])
    text = headlines.compare(view, summaries, 0, 0.01)
    more = summaries[1]["peak_reserved_bytes"] - summaries[0]["peak_reserved_bytes"]
    assert (
        text.startswith(f"Best option: {view['name'].iloc[1]} saves") and f"reserves {human_bytes(more)} more" in text
    )
    assert "no loss was recorded" in text
    even = {"max_rank": 0, "min_rank": 1, "max_bytes": 4096, "min_bytes": 4096, "skew_pct": 0.0, "ranks": 2}
    assert headlines.ranks(even, 2) == "All 2 ranks peak at 4.00 KiB: no skew."
