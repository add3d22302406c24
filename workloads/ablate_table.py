"""The ablation table: one row per configuration, diffs against the baseline, written as Parquet.

workloads/ablate.py runs the configurations and builds the table from their results with
`result_row` and `build_table`; `vramscope ablate` (workloads/ablate_cli.py) draws it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

from profiler.analysis.compare import memory_saved_pct, speed_change_pct
from workloads.suites import Config


def result_row(config: Config, result: dict, summary: dict | None = None, note: str | None = None) -> dict:
    """One table row from a configuration, its run's result and (when it ran) its trace summary.

    note: what to say when the row has no error of its own (a summary that failed).
    """
    summary = summary or {}
    ok = result.get("status") == "ok"
    peak = result.get("peak_allocated_bytes")
    row = {
        "name": config.name,
        "kind": config.kind,
        **{f"config.{k}": v for k, v in config.toggles.items()},
        "status": result.get("status"),
        "peak_allocated_bytes": peak if peak is not None else summary.get("peak_allocated_bytes"),
        "peak_reserved_bytes": result.get("peak_reserved_bytes", summary.get("peak_reserved_bytes")),
        "fragmentation_ratio_at_peak": summary.get("fragmentation_ratio_at_peak"),
        "median_step_ms": result.get("median_step_ms"),
        "tokens_per_s": result.get("tokens_per_s"),
        "loss": result.get("loss"),
        **{f"at_peak.{c}": b for c, b in (summary.get("categories_at_peak_bytes") or {}).items()},
        "run_dir": result.get("run_dir"),
        "note": result.get("error") or note,
    }
    if not ok:  # an OOM's partial numbers are not comparable with finished runs
        for key in ("median_step_ms", "tokens_per_s", "loss"):
            row[key] = None
    return row


def _num(value) -> float | None:
    return None if value is None or pd.isna(value) else float(value)


def baseline_diffs(row: dict, base: dict | None) -> dict:
    """memory_saved_pct, speed_change_pct and loss_delta of `row` against the baseline row.

    Memory saved and speed change as profiler.analysis.compare defines them (of peak
    allocated bytes; of tokens/s when both rows have it, else of median step times):
    positive = less memory, faster. loss delta = loss - base loss. None wherever a side is
    missing, and everywhere when either row did not finish.
    """
    out = {"memory_saved_pct": None, "speed_change_pct": None, "loss_delta": None}
    if not base or base.get("status") != "ok" or row.get("status") != "ok":
        return out
    out["memory_saved_pct"] = memory_saved_pct(base.get("peak_allocated_bytes"), row.get("peak_allocated_bytes"))
    out["speed_change_pct"] = speed_change_pct(
        base.get("median_step_ms"), row.get("median_step_ms"), base.get("tokens_per_s"), row.get("tokens_per_s")
    )
    bl, lo = _num(base.get("loss")), _num(row.get("loss"))
    if bl is not None and lo is not None:
        out["loss_delta"] = lo - bl
    return out


_INT_COLUMNS = ("peak_allocated_bytes", "peak_reserved_bytes")
_FLOAT_COLUMNS = (
    "fragmentation_ratio_at_peak",
    "median_step_ms",
    "tokens_per_s",
    "memory_saved_pct",
    "speed_change_pct",
    "loss",
    "loss_delta",
)
_ORDER = (
    "status",
    "peak_allocated_bytes",
    "peak_reserved_bytes",
    "fragmentation_ratio_at_peak",
    "median_step_ms",
    "tokens_per_s",
    "memory_saved_pct",
    "speed_change_pct",
    "loss",
    "loss_delta",
)


def build_table(rows: list[dict]) -> pd.DataFrame:
    """The ablation table: rows in order, the first one the baseline, diffs against it.

    Columns: name, kind, config.<toggle> (one per toggle any row sets, in first-seen order;
    text, null = off), status, the numbers (bytes as nullable Int64), at_peak.<category>
    bytes, run_dir, note.
    """
    base = rows[0] if rows else None
    rows = [{**r, **baseline_diffs(r, base)} for r in rows]
    seen = list(dict.fromkeys(k for r in rows for k in r))
    toggles = [k for k in seen if k.startswith("config.")]
    cats = sorted(k for k in seen if k.startswith("at_peak."))
    # Built column by column from the rows: a DataFrame of the dicts would turn an int
    # column with gaps into floats (accumulation 4 -> "4.0").
    dtypes = {
        **{c: "string" for c in ("name", "kind", "status", "run_dir", "note", *toggles)},
        **{c: "Int64" for c in (*_INT_COLUMNS, *cats)},
        **{c: "float64" for c in _FLOAT_COLUMNS},
    }
    columns = ["name", "kind", *toggles, *_ORDER, *cats, "run_dir", "note"]
    return pd.DataFrame(
        {c: _column([r.get(c) for r in rows], dtypes[c]) for c in columns}, index=pd.RangeIndex(len(rows))
    )


def _column(values: list, dtype: str) -> pd.Series:
    missing = [v is None or (isinstance(v, float) and math.isnan(v)) for v in values]
    if dtype == "string":  # toggles as text, so that a column mixing 4 and "every:2" still fits Parquet
        values = [None if m else str(v) for v, m in zip(values, missing)]
    elif dtype == "Int64":
        values = [None if m else int(v) for v, m in zip(values, missing)]
    else:
        values = [math.nan if m else float(v) for v, m in zip(values, missing)]
    return pd.Series(pd.array(values, dtype=dtype))


def write_table(df: pd.DataFrame, path, meta: dict | None = None) -> Path:
    """`df` as Parquet at `path`, atomically; `meta` goes into the schema metadata as JSON."""
    import pyarrow as pa

    from profiler.trace.writer import write_parquet

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pandas(df, preserve_index=False)
    if meta:
        table = table.replace_schema_metadata(
            {**(table.schema.metadata or {}), b"vramscope.ablation": json.dumps(meta).encode()}
        )
    write_parquet(path, table)
    return path
