"""Runs side by side: one summary per run, and the differences between runs.

Percentages are relative to run a (the baseline). memory_saved_pct is positive when
b needs less memory at its peak; speed_change_pct is positive when b's steps are faster.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from profiler.analysis.categories import category_at_peak
from profiler.analysis.fragmentation import fragmentation_at_peak
from profiler.analysis.live import lifetimes
from profiler.analysis.modules import module_table
from profiler.analysis.timeline import int_column, peak, reserved_bytes, start_reserved_bytes

# What compare() lines up, in this order; everything else in a summary is a label.
METRICS = ("peak_allocated_bytes", "peak_reserved_bytes", "allocator_max_allocated_bytes",
           "allocator_max_reserved_bytes", "fragmentation_ratio_at_peak",
           "reserved_minus_allocated_at_peak_bytes", "median_step_time_us", "steps", "events",
           "events_dropped")


def flatten(config, prefix: str = "config.") -> dict:
    """{"a": {"b": 1}} -> {"config.a.b": 1}: one column per toggle in a runs table."""
    out = {}
    for key, value in (config or {}).items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def median_step_time_us(trace) -> float | None:
    """Median of the differences between consecutive step-end timestamps; None under two steps."""
    steps = trace.steps
    if len(steps) < 2:
        return None
    ts = int_column(steps.sort_values("step", kind="stable"), "ts_us")
    return float(np.median(np.diff(ts)))


def _int_or_none(value) -> int | None:
    return None if value is None or pd.isna(value) else int(value)


def summarize(trace, lt=None) -> dict:
    """Labels, config toggles (flattened) and headline numbers of one run."""
    lt = lt or lifetimes(trace)
    top = peak(trace, lt)
    reserved = reserved_bytes(trace)
    frag = fragmentation_at_peak(trace, lt)
    meta = trace.meta
    n_steps = len(trace.steps) or int((np.unique(int_column(trace.events, "step", -1)) >= 0).sum())
    allocator_max = _int_or_none(meta.get("max_allocated_bytes"))
    if reserved is not None:  # the state before the first event counts too
        peak_reserved = max([start_reserved_bytes(trace)] + ([int(reserved.max())] if len(reserved) else []))
    else:
        peak_reserved = None
    return {
        "run_id": trace.run_id, "name": trace.name, "backend": trace.backend,
        "device": meta.get("device"), "torch_version": meta.get("torch_version"),
        "status": trace.status,
        **flatten(meta.get("config")),
        "peak_allocated_bytes": top.allocated_bytes,
        "peak_step": top.step, "peak_phase": top.phase, "peak_event_index": top.event_index,
        "allocator_max_allocated_bytes": allocator_max,
        "replay_matches_allocator": None if allocator_max is None else allocator_max == top.allocated_bytes,
        "peak_reserved_bytes": peak_reserved,
        "allocator_max_reserved_bytes": _int_or_none(meta.get("max_reserved_bytes")),
        "fragmentation_ratio_at_peak": frag["fragmentation_ratio"],
        "reserved_minus_allocated_at_peak_bytes": frag["reserved_minus_allocated_bytes"],
        "median_step_time_us": median_step_time_us(trace),
        "steps": n_steps, "events": len(trace.events),
        "events_dropped": _int_or_none(meta.get("events_dropped")) or 0,
    }


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

    a, b and delta are object columns so that byte counts stay exact Python ints.
    """
    sa, sb = summarize(run_a), summarize(run_b)
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


def compare_categories(run_a, run_b) -> pd.DataFrame:
    """Per category: bytes alive at each run's peak, and the difference (largest change first)."""
    ca, cb = category_at_peak(run_a), category_at_peak(run_b)
    return _diff(ca.set_index("category")["total_bytes"], cb.set_index("category")["total_bytes"],
                 "category")


def compare_modules(run_a, run_b, column: str = "peak_contribution_bytes") -> pd.DataFrame:
    """Per module: `column` of module_table in each run, and the difference (largest change first)."""
    ma, mb = module_table(run_a), module_table(run_b)
    return _diff(ma.set_index("module")[column], mb.set_index("module")[column], "module")


def compare_many(traces, baseline=0) -> pd.DataFrame:
    """One summary row per run, with memory_saved_pct and speed_change_pct against `baseline`.

    baseline: an index into `traces`, a run_id, or one of the traces.
    """
    traces = list(traces)
    summaries = [summarize(t) for t in traces]
    if isinstance(baseline, int):
        base = summaries[baseline]
    else:
        run_id = baseline if isinstance(baseline, str) else baseline.run_id
        matches = [s for s in summaries if s["run_id"] == run_id]
        if not matches:
            raise ValueError(f"baseline run {run_id!r} is not among the runs compared")
        base = matches[0]
    rows = [{**s, **headline(base, s), "is_baseline": s is base} for s in summaries]
    return pd.DataFrame(rows)
