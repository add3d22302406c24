"""Runs side by side: one summary per run, and the differences between runs.

Everything here works from run summaries (summary.run_summary), so that comparing
runs costs a JSON file per run when their summaries are cached; the functions that
take runs accept a Trace or a summary dict for each. Only compare_modules needs
whole traces.

Percentages are relative to run a (the baseline). The two headline numbers, memory
saved and speed change, have one definition each (memory_saved_pct, speed_change_pct),
which `vramscope ablate`, compare() and the dashboard's Compare page all use.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import PurePath

import numpy as np
import pandas as pd

from profiler.analysis.categories import category_at_peak
from profiler.analysis.modules import module_table
from profiler.analysis.summary import median_step_time_us, run_summary  # noqa: F401  (re-exported)

# What compare() lines up, in this order; everything else in a summary is a label.
METRICS = (
    "peak_allocated_bytes",
    "peak_active_bytes",
    "peak_reserved_bytes",
    "allocator_max_allocated_bytes",
    "allocator_max_reserved_bytes",
    "fragmentation_ratio_at_peak",
    "reserved_minus_allocated_at_peak_bytes",
    "median_step_time_us",
    "tokens_per_s",
    "steps",
    "events",
    "events_dropped",
)
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


@dataclass(frozen=True, slots=True)
class Headline:
    """What a comparison leads with: a run against its baseline, in percent (None: not measured)."""

    memory_saved_pct: float | None
    speed_change_pct: float | None

    def as_dict(self) -> dict:
        return asdict(self)


def _number(value) -> float | None:
    """A float, or None for None, NaN, NA and anything that is not a number."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(value) else value


def _positive(value) -> float | None:
    value = _number(value)
    return value if value is not None and value > 0 else None


def memory_saved_pct(baseline_bytes, run_bytes) -> float | None:
    """(baseline - run) / baseline x 100, of peak bytes.

    Positive when the run needs less memory (25: a quarter less), negative when it needs
    more (-50: half as much again). None when either side is missing or the baseline is 0.
    """
    base, run = _positive(baseline_bytes), _number(run_bytes)
    if base is None or run is None:
        return None
    return (base - run) / base * 100.0


def speed_change_pct(
    baseline_step_time, run_step_time, baseline_tokens_per_s=None, run_tokens_per_s=None
) -> float | None:
    """Throughput gained, in percent: (run tokens/s / baseline tokens/s - 1) x 100.

    Positive when the run is faster: +25 is a quarter more work per second (steps of 80 us
    against 100 us), +100 twice as fast, -50 half as fast. It is not the time saved per
    step ((100 - 80) / 100 = 20), which understates a speed-up (twice as fast saves 50%)
    and never reaches +100.
    Tokens per second when both runs have a positive one: that is fair when a step
    processes more tokens (a larger batch takes longer yet does more). Otherwise the
    ratio of step times, baseline / run, which is the same number when steps process as
    many tokens. Step times may be in any unit, the same on both sides. None when
    neither pair is known.
    """
    base_rate, rate = _positive(baseline_tokens_per_s), _positive(run_tokens_per_s)
    if base_rate is not None and rate is not None:
        return (rate / base_rate - 1.0) * 100.0
    base_time, run_time = _positive(baseline_step_time), _positive(run_step_time)
    if base_time is not None and run_time is not None:
        return (base_time / run_time - 1.0) * 100.0
    return None


def headline(baseline: dict, run: dict) -> Headline:
    """Memory saved and speed change of one run summary (run_summary, ranks.run_group_summary_of)
    against another: peak allocated bytes, tokens/s or median step time."""
    return Headline(
        memory_saved_pct=memory_saved_pct(baseline.get("peak_allocated_bytes"), run.get("peak_allocated_bytes")),
        speed_change_pct=speed_change_pct(
            baseline.get("median_step_time_us"),
            run.get("median_step_time_us"),
            baseline.get("tokens_per_s"),
            run.get("tokens_per_s"),
        ),
    )


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
    rows = [
        {
            "metric": m,
            "a": sa.get(m),
            "b": sb.get(m),
            "delta": _delta(sa.get(m), sb.get(m)),
            "delta_pct": _pct(sa.get(m), sb.get(m)),
        }
        for m in METRICS
    ]
    rows += [
        {"metric": k, "a": None, "b": None, "delta": None, "delta_pct": v}
        for k, v in headline(sa, sb).as_dict().items()
    ]
    # Built column by column: pandas would turn ints mixed with None into floats.
    return pd.DataFrame(
        {
            "metric": [r["metric"] for r in rows],
            **{c: pd.Series([r[c] for r in rows], dtype=object) for c in ("a", "b", "delta")},
            "delta_pct": pd.Series([r["delta_pct"] for r in rows], dtype=float),
        }
    )


def _diff(a: pd.Series, b: pd.Series, key: str) -> pd.DataFrame:
    df = pd.concat([a.rename("a_bytes"), b.rename("b_bytes")], axis=1).fillna(0).astype(np.int64)
    df["delta_bytes"] = df["b_bytes"] - df["a_bytes"]
    with np.errstate(divide="ignore", invalid="ignore"):
        df["delta_pct"] = np.where(
            df["a_bytes"] != 0, df["delta_bytes"] / df["a_bytes"].where(df["a_bytes"] != 0, 1) * 100.0, np.nan
        )
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
    rows = [{**summary_row(s), **headline(base, s).as_dict(), "is_baseline": s is base} for s in summaries]
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


def world_size_of(summary: dict) -> int:
    """A summary's world_size (a job's, or a single run's from its config), else 1."""
    config = summary.get("config")
    if not isinstance(config, dict):
        config = {}
    return int(summary.get("world_size") or config.get("world_size") or 1)


def ablation_view(summaries: list[dict], baseline: int, losses: pd.DataFrame, runs: list) -> pd.DataFrame:
    """compare_summaries against `baseline` (an index), with each run's directory name (`runs`:
    their paths), world_size, and loss and loss_delta (loss - the baseline's loss) where `losses`
    (run: a directory name, loss) has them. The headline columns come first."""
    table = compare_summaries(summaries, baseline)
    table.insert(0, "run", [PurePath(r).name for r in runs])
    table["world_size"] = [world_size_of(s) for s in summaries]
    loss = dict(zip(losses["run"], losses["loss"]))
    table["loss"] = [loss.get(PurePath(r).name) for r in runs]
    base = table["loss"].iloc[baseline]
    table["loss_delta"] = [
        None if v is None or base is None or pd.isna(v) or pd.isna(base) else v - base for v in table["loss"]
    ]
    front = [
        "run",
        "name",
        "world_size",
        "is_baseline",
        "memory_saved_pct",
        "speed_change_pct",
        "loss",
        "loss_delta",
        "peak_allocated_bytes",
        "peak_reserved_bytes",
        "median_step_time_us",
    ]
    front = [c for c in front if c in table]
    return table[front + [c for c in table.columns if c not in front]]


def differing_columns(df: pd.DataFrame, keep=("name",)) -> list[str]:
    """Columns whose values are not all the same (plus `keep`): a comparison's "differences only" view."""
    out = []
    for c in df.columns:
        values = df[c].astype(str)
        if c in keep or values.nunique(dropna=False) > 1:
            out.append(c)
    return out


# -- two runs in full: `vramscope diff` -------------------------------------------------------

PHASE_DIFF_COLUMNS = ("step", "phase", "a_peak_bytes", "b_peak_bytes", "delta_bytes", "a_has_peak", "b_has_peak")


def phase_peaks(trace, lt=None) -> pd.DataFrame:
    """step, phase, peak_bytes (allocated), has_peak: the highest allocated bytes in each (step, phase)
    span of phase_spans, and whether the run's peak event lies in it."""
    from profiler.analysis.live import lifetimes
    from profiler.analysis.timeline import peak, phase_spans

    lt = lt or lifetimes(trace)
    spans = phase_spans(trace)
    spans = spans[spans["event_index_end"] >= spans["event_index_start"]]
    starts = spans["event_index_start"].to_numpy(np.int64)
    ends = spans["event_index_end"].to_numpy(np.int64)
    at = peak(trace, lt).event_index
    out = pd.DataFrame(
        {
            "step": spans["step"].to_numpy(np.int64),
            "phase": spans["phase"].astype(str).to_numpy(),
            "peak_bytes": [int(lt.allocated_bytes[s : e + 1].max()) for s, e in zip(starts, ends)],
            "has_peak": (starts <= at) & (at <= ends),
        }
    )
    # A phase may come back within a step (recompute inside backward): one row, its highest.
    return out.groupby(["step", "phase"], sort=False, as_index=False).agg(
        peak_bytes=("peak_bytes", "max"), has_peak=("has_peak", "any")
    )


def compare_phases(run_a, run_b, lt_a=None, lt_b=None) -> pd.DataFrame:
    """PHASE_DIFF_COLUMNS: each (step, phase) of either run with its peak allocated bytes in both,
    aligned by step number and phase name; a_has_peak / b_has_peak mark the span holding each run's peak."""
    a, b = phase_peaks(run_a, lt_a), phase_peaks(run_b, lt_b)
    df = a.merge(b, on=["step", "phase"], how="outer", suffixes=("_a", "_b"), sort=False)
    order = {p: i for i, p in enumerate(dict.fromkeys(list(a["phase"]) + list(b["phase"])))}
    df = df.assign(_order=df["phase"].map(order)).sort_values(["step", "_order"], kind="stable")
    out = pd.DataFrame(
        {
            "step": df["step"].astype(np.int64).to_numpy(),
            "phase": df["phase"].to_numpy(),
            "a_peak_bytes": df["peak_bytes_a"].astype("Int64").to_numpy(),
            "b_peak_bytes": df["peak_bytes_b"].astype("Int64").to_numpy(),
            "a_has_peak": df["has_peak_a"].fillna(False).astype(bool).to_numpy(),
            "b_has_peak": df["has_peak_b"].fillna(False).astype(bool).to_numpy(),
        }
    )
    out["delta_bytes"] = out["b_peak_bytes"] - out["a_peak_bytes"]
    return out[list(PHASE_DIFF_COLUMNS)].reset_index(drop=True)


@dataclass(frozen=True)
class RunDiff:
    """Two runs side by side, as `vramscope diff` shows them: compare()'s metrics, the categories
    and modules at each run's peak (compare_categories, compare_modules: the Compare page's), the
    (step, phase) spans aligned (compare_phases), and where each run peaked."""

    a: dict  # run_summary of a
    b: dict
    metrics: pd.DataFrame
    categories: pd.DataFrame
    modules: pd.DataFrame
    phases: pd.DataFrame


def diff_runs(trace_a, trace_b) -> RunDiff:
    """Everything `vramscope diff A B` prints, from two Traces (each paired once)."""
    from profiler.analysis.live import lifetimes

    lt_a, lt_b = lifetimes(trace_a), lifetimes(trace_b)
    sa, sb = run_summary(trace_a, lt_a), run_summary(trace_b, lt_b)
    return RunDiff(
        a=sa,
        b=sb,
        metrics=compare(sa, sb),
        categories=compare_categories(sa, sb),
        modules=compare_modules(trace_a, trace_b),
        phases=compare_phases(trace_a, trace_b, lt_a, lt_b),
    )
