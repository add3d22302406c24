"""Seconds to open the dashboard's heaviest pages on a synthetic 10M-event run, as the pages do it.

    python bench/dashboard.py [--events 10000000] [--repeat 3] [--runs 8]

bench/analysis.py times the analysis functions; this one times what the pages
themselves run, through the dashboard's own code (dashboard/data.py and
dashboard/figures.py), cold: a first visit, with Streamlit's caches empty.
The synthetic trace is bench/analysis.py's (built in memory: reading the
Parquet files is not timed).

- Overview: pairing the lifetimes and the run summary (what data.trace_of and
  data.summary_of compute on a miss), the peak story (data.peak_story: categories,
  module parts and allocation sites at the peak) and its headline, the memory
  timeline with steps, phases and counters (data.timeline_parts), what is alive at
  the peak by module, and the three Plotly figures.
- Overview rerun: a widget change (the slider, a click on the timeline, the time
  axis) with the run's caches warm: what is alive at the new moment, the x axis
  in seconds, and the figures again.
- Layers: the module table, its parts (roll-up, the root's own bytes, the bytes in
  no module), the bar and the treemap.
- Compare: 8 runs through their summary.json (summary_cache.load_summary, what
  data.stored_summary caches), the ablation losses beside them, data.ablation_view
  and the "differences only" columns.
Budgets on a 2-core machine: 2 s, 1 s, 2 s and 3 s.

    python bench/dashboard.py --page-run traces/h100-ablation-kv/ablate-kv-vary-kv-concat-...

also runs the Overview and Fragmentation pages themselves (Streamlit's AppTest, no browser) on
a run on disk: each first visit on a warm server (imports paid, caches empty), then reruns after
widget changes (Overview: the moment, the time axis; Fragmentation: the whole segment map, the
map at another moment), with the same budgets.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import analysis as _bench  # noqa: E402  (bench/analysis.py)
from analysis import build_trace, make_compare_runs  # noqa: E402


def _trace_with_kv(Trace):
    """bench/analysis.py builds Trace(...) without the kv table that Trace later gained: supply
    an empty one (a training run has none) until the generator passes it itself."""
    import dataclasses

    from profiler.trace import schema

    if "kv" not in {f.name for f in dataclasses.fields(Trace)}:
        return Trace

    def make(**kw):
        kw.setdefault("kv", schema.empty_table("kv").to_pandas())
        return Trace(**kw)

    return make


_bench.Trace = _trace_with_kv(_bench.Trace)

BUDGETS = {
    "Overview": 2.0,
    "Overview rerun": 1.0,
    "Layers": 2.0,
    "Compare": 3.0,
    "Overview page": 2.0,
    "Overview page rerun": 1.0,
    "Fragmentation page": 2.0,
    "Fragmentation page rerun": 1.0,
}


def _quiet_streamlit() -> None:
    """dashboard.data decorates with st.cache_*: outside `streamlit run` that logs a warning per call."""
    import dashboard.data  # noqa: F401  (streamlit sets its loggers' levels on import)

    for name in (
        "streamlit",
        "streamlit.runtime.caching.cache_data_api",
        "streamlit.runtime.scriptrunner_utils.script_run_context",
    ):
        logging.getLogger(name).setLevel(logging.ERROR)


def overview(trace) -> dict:
    from dashboard import data
    from profiler import analysis, headlines

    t = {}
    t0 = time.perf_counter()
    lt = analysis.lifetimes(trace)  # data.trace_of, on a miss
    s = analysis.run_summary(trace, lt)  # data.summary_of, on a miss
    story = data.peak_story(trace, lt)  # data.peak_story_of, on a miss
    p = story["peak"]
    headlines.overview(p, story["categories"], story["parts"], story["sites"])
    drawn = data.timeline_parts(trace, lt)  # data.timeline_parts_of, on a miss
    t["data"] = time.perf_counter() - t0
    rerun = overview_rerun(trace, lt, story, drawn, max(p.event_index, 0))
    t["figures"] = rerun["figures"]
    t["data"] += rerun["data"]
    assert s["peak_allocated_bytes"] == p.allocated_bytes
    return t


def overview_rerun(trace, lt, story: dict, drawn: dict, moment: int) -> dict:
    """What the Overview computes again on a widget change, its caches warm."""
    from dashboard import data, figures
    from profiler import analysis

    t = {}
    t0 = time.perf_counter()
    x_of = data.event_axis(trace, story["spans"], "seconds")
    by_module = analysis.breakdown(analysis.live_at(trace, moment, lt), "module")
    t["data"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    figures.memory_timeline(drawn["timeline"], story["peak"], story["spans"], drawn["phases"], moment, x_of, "seconds")
    figures.breakdown_bar(by_module, "module", "alive at the moment")
    if not drawn["counters"].empty:
        figures.allocator_counters(drawn["counters"])
    t["figures"] = time.perf_counter() - t0
    return t


def layers(trace) -> dict:
    from dashboard import data, figures
    from profiler import analysis
    from profiler.analysis.modules import no_module_at_peak

    t = {}
    t0 = time.perf_counter()
    lt = analysis.lifetimes(trace)  # data.trace_of, on a miss
    table = analysis.module_table(trace, lt=lt)  # data.module_table_of, on a miss
    parts = data.parts_of(table, "peak_contribution_bytes", no_module_at_peak(trace, lt))
    t["data"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    figures.module_bar(parts, "peak_contribution_bytes")
    figures.module_tree(parts, "peak_contribution_bytes", "treemap")
    t["figures"] = time.perf_counter() - t0
    return t


def compare(root: Path, runs: list[Path]) -> dict:
    from dashboard import data
    from profiler.trace.summary_cache import load_summary

    def no_trace(path):  # a cache miss here would be a bug in the bench, not a slow page
        raise AssertionError(f"{path}: summary.json was not used")

    t0 = time.perf_counter()
    summaries = [load_summary(r, load=no_trace) for r in runs]  # data.stored_summary, cold
    losses = data.ablation_losses(root)  # data.cached_ablation_losses, cold
    view = data.ablation_view(summaries, 0, losses, [str(r) for r in runs])
    data.differing_columns(view, keep=("run", "name", "is_baseline"))
    return {"data": time.perf_counter() - t0, "figures": 0.0}


def page_visits(run: Path, repeat: int) -> dict[str, list[dict]]:
    """Seconds of the Overview and Fragmentation pages' scripts on `run`: a first visit with the
    caches empty (after one visit that pays the imports), and reruns after widget changes
    (Overview: the moment and the time axis; Fragmentation: the whole segment map, then the
    segment map at another moment)."""
    out: dict[str, list[dict]] = {}
    for page, label, changes in (
        ("overview", "Overview page", _overview_changes),
        ("fragmentation", "Fragmentation page", _fragmentation_changes),
    ):
        out[label], out[label + " rerun"] = _page_visits(run, page, repeat, changes)
    return out


def _overview_changes(at, k: int, repeat: int) -> list:
    moment = at.slider(key="overview_moment").max * (k + 1) // (repeat + 1)
    return [
        lambda: at.slider(key="overview_moment").set_value(moment),
        lambda: at.radio(key="overview_axis").set_value("steps"),
    ]


def _fragmentation_changes(at, k: int, repeat: int) -> list:
    options = at.selectbox(key="frag_at").options
    other = options[(k + 1) % len(options)]
    return [
        lambda: at.toggle(key="frag_all_segments").set_value(True),
        lambda: at.selectbox(key="frag_at").set_value(other),
    ]


def _page_visits(run: Path, page: str, repeat: int, changes) -> tuple[list[dict], list[dict]]:
    import os

    import streamlit as st
    from streamlit.testing.v1 import AppTest

    os.environ["VRAMSCOPE_TRACES"] = str(run.parent)

    def visit() -> tuple[AppTest, float]:
        at = AppTest.from_file(str(REPO / "dashboard" / "pages" / f"{page}.py"), default_timeout=120)
        at.session_state["current_run"] = str(run)
        t0 = time.perf_counter()
        at.run()
        assert not at.exception, [e.value for e in at.exception]
        return at, time.perf_counter() - t0

    visit()  # the imports, once per server process
    visits, reruns = [], []
    for k in range(repeat):
        st.cache_data.clear()
        st.cache_resource.clear()
        at, seconds = visit()
        visits.append({"data": seconds, "figures": 0.0})
        for change in changes(at, k, repeat):
            change()
            t0 = time.perf_counter()
            at.run()
            assert not at.exception, [e.value for e in at.exception]
            reruns.append({"data": time.perf_counter() - t0, "figures": 0.0})
    return visits, reruns


def _load_summary_accepts_load() -> bool:
    import inspect

    from profiler.trace.summary_cache import load_summary

    return "load" in inspect.signature(load_summary).parameters


def layers_parts_tiny():
    import pandas as pd

    return pd.DataFrame({"id": ["m"], "parent": [""], "label": ["m"], "bytes": [1], "kind": ["module"]})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=10_000_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--runs", type=int, default=8)
    parser.add_argument("--page-run", type=Path, help="also time the Overview and Fragmentation pages on this run")
    args = parser.parse_args(argv)
    _quiet_streamlit()

    import os

    t = time.perf_counter()
    trace = build_trace(args.events)
    print(
        f"synthetic trace: {len(trace.events):,} events, {len(trace.modules)} modules "
        f"(built in {time.perf_counter() - t:.1f} s); {os.cpu_count()} CPUs"
    )

    # Once per server process, not per visit: importing plotly's figure classes and validators.
    t = time.perf_counter()
    from dashboard import figures

    figures.module_bar(layers_parts_tiny(), "param_bytes")
    print(f"server warm-up (plotly's first figure, not counted below): {time.perf_counter() - t:.2f} s")

    from dashboard import data
    from profiler import analysis
    from profiler.analysis import run_summary

    lt = analysis.lifetimes(trace)
    story, drawn = data.peak_story(trace, lt), data.timeline_parts(trace, lt)
    moments = [len(trace.events) * k // (args.repeat + 1) for k in range(1, args.repeat + 1)]
    results = {
        "Overview": [overview(trace) for _ in range(args.repeat)],
        "Overview rerun": [overview_rerun(trace, lt, story, drawn, m) for m in moments],
        "Layers": [layers(trace) for _ in range(args.repeat)],
    }
    summary = run_summary(trace)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        runs = make_compare_runs(root, summary, args.runs)
        if not _load_summary_accepts_load():
            raise SystemExit("profiler.trace.summary_cache.load_summary takes no load=: update the bench")
        results["Compare"] = [compare(root, runs) for _ in range(args.repeat)]
    if args.page_run is not None:
        results.update(page_visits(args.page_run, args.repeat))

    print(
        f"\n{'page':<24}{'data s':>8}{'figures s':>11}{'first s':>9}{'median s':>10}{'max s':>8}"
        f"{'budget s':>10}  verdict"
    )
    failed = False
    for page, rounds in results.items():
        totals = [r["data"] + r["figures"] for r in rounds]
        budget = BUDGETS[page]
        ok = max(totals) <= budget
        failed |= not ok
        label = page if page != "Compare" else f"Compare ({args.runs} runs)"
        label = label.replace("Overview page", "page: Overview").replace("Fragmentation page", "page: Fragmentation")
        print(
            f"{label:<24}{statistics.median(r['data'] for r in rounds):>8.3f}"
            f"{statistics.median(r['figures'] for r in rounds):>11.3f}{totals[0]:>9.3f}"
            f"{statistics.median(totals):>10.3f}{max(totals):>8.3f}{budget:>10.1f}  "
            f"{'ok' if ok else 'OVER BUDGET'}"
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
