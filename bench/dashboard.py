"""Seconds to open the dashboard's heaviest pages on a synthetic 10M-event run, as the pages do it.

    python bench/dashboard.py [--events 10000000] [--repeat 3] [--runs 8]

bench/analysis.py times the analysis functions; this one times what the pages
themselves run, through the dashboard's own code (dashboard/data.py and
dashboard/figures.py), cold: a first visit, with Streamlit's caches empty.
The synthetic trace is bench/analysis.py's (built in memory: reading the
Parquet files is not timed).

- Overview: pairing the lifetimes and the run summary (what data.trace_of and
  data.summary_of compute on a miss), the peak, the memory timeline with steps
  and phases, what is alive at the peak by module, the per-step allocator
  counters, and the three Plotly figures.
- Layers: the module table, its roll-up, the bar and the treemap.
- Compare: 8 runs through their summary.json (summary_cache.load_summary, what
  data.stored_summary caches), the ablation losses beside them, data.ablation_view
  and the "differences only" columns.
Budgets on a 2-core machine: 2 s, 2 s and 3 s.
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

BUDGETS = {"Overview": 2.0, "Layers": 2.0, "Compare": 3.0}


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
    from dashboard import data, figures
    from profiler import analysis

    t = {}
    t0 = time.perf_counter()
    lt = analysis.lifetimes(trace)  # data.trace_of, on a miss
    s = analysis.run_summary(trace, lt)  # data.summary_of, on a miss
    p = analysis.peak(trace, lt)
    tl = analysis.memory_timeline(trace, lt, max_points=data.MAX_POINTS)
    steps, phases = analysis.step_spans(trace, lt), analysis.phase_spans(trace)
    moment = max(p.event_index, 0)
    by_module = analysis.breakdown(analysis.live_at(trace, moment, lt), "module")
    counters = analysis.allocator_counters(trace)
    t["data"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    figures.memory_timeline(tl, p, steps, phases, moment)
    figures.breakdown_bar(by_module, "module", "alive at the peak")
    if not counters.empty:
        figures.allocator_counters(counters)
    t["figures"] = time.perf_counter() - t0
    assert s["peak_allocated_bytes"] == p.allocated_bytes
    return t


def layers(trace) -> dict:
    from dashboard import figures
    from profiler import analysis

    t = {}
    t0 = time.perf_counter()
    lt = analysis.lifetimes(trace)  # data.trace_of, on a miss
    table = analysis.module_table(trace, lt=lt)
    rolled = analysis.rollup(table)
    t["data"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    figures.module_bar(table, "peak_contribution_bytes")
    figures.module_tree(rolled, "peak_contribution_bytes", "treemap")
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


def _load_summary_accepts_load() -> bool:
    import inspect

    from profiler.trace.summary_cache import load_summary

    return "load" in inspect.signature(load_summary).parameters


def layers_table_tiny():
    import pandas as pd

    return pd.DataFrame({"module": ["m"], "class_name": ["M"], "depth": [0], "param_bytes": [1]})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=10_000_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--runs", type=int, default=8)
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

    figures.module_bar(layers_table_tiny(), "param_bytes")
    print(f"server warm-up (plotly's first figure, not counted below): {time.perf_counter() - t:.2f} s")

    from profiler.analysis import run_summary

    results = {
        "Overview": [overview(trace) for _ in range(args.repeat)],
        "Layers": [layers(trace) for _ in range(args.repeat)],
    }
    summary = run_summary(trace)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        runs = make_compare_runs(root, summary, args.runs)
        if not _load_summary_accepts_load():
            raise SystemExit("profiler.trace.summary_cache.load_summary takes no load=: update the bench")
        results["Compare"] = [compare(root, runs) for _ in range(args.repeat)]

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
        print(
            f"{label:<24}{statistics.median(r['data'] for r in rounds):>8.3f}"
            f"{statistics.median(r['figures'] for r in rounds):>11.3f}{totals[0]:>9.3f}"
            f"{statistics.median(totals):>10.3f}{max(totals):>8.3f}{budget:>10.1f}  "
            f"{'ok' if ok else 'OVER BUDGET'}"
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
