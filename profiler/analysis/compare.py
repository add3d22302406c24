"""Runs side by side: one summary per run, and the differences between runs.

Everything here works from run summaries (summary.run_summary), so that comparing
runs costs a JSON file per run when their summaries are cached; the functions that
take runs accept a Trace or a summary dict for each. Only compare_modules needs
whole traces.

Percentages are relative to run a (the baseline). memory_saved_pct is positive when
b needs less memory at its peak; speed_change_pct is positive when b's steps are faster.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from profiler.analysis.categories import category_at_peak
from profiler.analysis.modules import module_table
from profiler.analysis.summary import median_step_time_us, run_summary  # noqa: F401  (re-exported)

# What compare() lines up, in this order; everything else in a summary is a label.
METRICS = ("peak_allocated_bytes", "peak_active_bytes", "peak_reserved_bytes", "allocator_max_allocated_bytes",
           "allocator_max_reserved_bytes", "fragmentation_ratio_at_peak",
           "reserved_minus_allocated_at_peak_bytes", "median_step_time_us", "tokens_per_s", "steps", "events",
           "events_dropped")
# Nested summary entries and the prefix of the columns they become in a flat row.
_NESTED = {"config": "config.", "categories_at_peak_bytes": "at_peak.", "category_peak_bytes": "category_peak."}


def flatten(config, prefix: str = "config.") -> dict:
    """{"a": {"b": 1}} -> {"config.a.b": 1}: one column per toggle in a runs table."""
    out = {}
    for key, value in (config or {}).items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def summary_row(summary: dict) -> dict:
    """A summary as one flat row: config.<toggle>, at_peak.<category> (bytes at the peak),
    category_peak.<category> (the category's own maximum), and every other entry as it is."""
    row = {k: v for k, v in summary.items() if k not in _NESTED}
    for key, prefix in _NESTED.items():
        row.update(flatten(summary.get(key), prefix))
    return row


def _summary_of(run, lt=None) -> dict:
    return run if isinstance(run, dict) else run_summary(run, lt)


def summarize(trace, lt=None) -> dict:
    """Labels, config toggles and headline numbers of one run, as one flat row (summary_row)."""
    return summary_row(_summary_of(trace, lt))


def _pct(a, b) -> float | None:
    if a is None or b is None or pd.isna(a) or pd.isna(b) or a == 0:
        return None
    return (b - a) / a * 100.0


def headline(a: dict, b: dict) -> dict:
    """memory_saved_pct and speed_change_pct of summary b against summary a."""
    mem = _pct(a.get("peak_allocated_bytes"), b.get("peak_allocated_bytes"))
    ta, tb = a.get("median_step_time_us"), b.get("median_step_time_us")
    speed = (ta / tb - 1.0) * 100.0 if ta and tb else None  # throughput gained, not time saved
    return {"memory_saved_pct": None if mem is None else -mem, "speed_change_pct": speed}


def _delta(a, b):
    if a is None or b is None or pd.isna(a) or pd.isna(b):
        return None
    return b - a


def compare(run_a, run_b) -> pd.DataFrame:
    """metric, a, b, delta (b - a), delta_pct, for every METRICS entry, then the two headline rows.

    run_a, run_b: Traces or summaries. a, b and delta are object columns so that byte
    counts stay exact Python ints.
    """
    sa, sb = _summary_of(run_a), _summary_of(run_b)
    rows = [{"metric": m, "a": sa.get(m), "b": sb.get(m), "delta": _delta(sa.get(m), sb.get(m)),
             "delta_pct": _pct(sa.get(m), sb.get(m))} for m in METRICS]
    rows += [{"metric": k, "a": None, "b": None, "delta": None, "delta_pct": v}
             for k, v in headline(sa, sb).items()]
    # Built column by column: pandas would turn ints mixed with None into floats.
    return pd.DataFrame({
        "metric": [r["metric"] for r in rows],
        **{c: pd.Series([r[c] for r in rows], dtype=object) for c in ("a", "b", "delta")},
        "delta_pct": pd.Series([r["delta_pct"] for r in rows], dtype=float),
    })


def _diff(a: pd.Series, b: pd.Series, key: str) -> pd.DataFrame:
    df = pd.concat([a.rename("a_bytes"), b.rename("b_bytes")], axis=1).fillna(0).astype(np.int64)
    df["delta_bytes"] = df["b_bytes"] - df["a_bytes"]
    with np.errstate(divide="ignore", invalid="ignore"):
        df["delta_pct"] = np.where(df["a_bytes"] != 0,
                                   df["delta_bytes"] / df["a_bytes"].where(df["a_bytes"] != 0, 1) * 100.0,
                                   np.nan)
    df.index.name = key
    df = df.reset_index()
    order = np.argsort(-np.abs(df["delta_bytes"].to_numpy()), kind="stable")
    return df.iloc[order].reset_index(drop=True)


def _categories_at_peak(run) -> pd.Series:
    if isinstance(run, dict):
        return pd.Series(run.get("categories_at_peak_bytes") or {}, dtype=np.int64)
    return category_at_peak(run).set_index("category")["total_bytes"]


def compare_categories(run_a, run_b) -> pd.DataFrame:
    """Per category: bytes allocated at each run's peak, and the difference (largest change first).

    run_a, run_b: Traces or summaries."""
    return _diff(_categories_at_peak(run_a), _categories_at_peak(run_b), "category")


def compare_modules(run_a, run_b, column: str = "peak_contribution_bytes") -> pd.DataFrame:
    """Per module: `column` of module_table in each run, and the difference (largest change first)."""
    ma, mb = module_table(run_a), module_table(run_b)
    return _diff(ma.set_index("module")[column], mb.set_index("module")[column], "module")


def compare_summaries(summaries, baseline=0) -> pd.DataFrame:
    """One flat row per run (summary_row), with memory_saved_pct, speed_change_pct and
    is_baseline against `baseline`: an index into `summaries`, a run_id, or one of them."""
    summaries = list(summaries)
    if isinstance(baseline, (int, np.integer)) and not isinstance(baseline, bool):
        base = summaries[baseline]
    else:
        run_id = baseline if isinstance(baseline, str) else _summary_run_id(baseline)
        matches = [s for s in summaries if s["run_id"] == run_id]
        if not matches:
            raise ValueError(f"baseline run {run_id!r} is not among the runs compared")
        base = matches[0]
    rows = [{**summary_row(s), **headline(base, s), "is_baseline": s is base} for s in summaries]
    return pd.DataFrame(rows)


def _summary_run_id(run) -> str:
    return run["run_id"] if isinstance(run, dict) else run.run_id


def compare_many(runs, baseline=0) -> pd.DataFrame:
    """compare_summaries over runs given as Traces or summaries (a Trace is summarised here).

    baseline: an index into `runs`, a run_id, or one of the runs.
    """
    runs = list(runs)
    summaries = [_summary_of(r) for r in runs]
    if not isinstance(baseline, (int, str, np.integer)):
        baseline = _summary_run_id(baseline)
    return compare_summaries(summaries, baseline)
