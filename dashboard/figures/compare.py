"""The Compare page: runs' timelines overlaid by step, and where their bytes differ."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from dashboard.figures.base import byte_unit, empty_figure, in_unit, integer_ticks, mark_unit, with_layout

SERIES_NAMES = {"allocated_bytes": "allocated", "active_bytes": "active", "reserved_bytes": "reserved"}


def overlay_timelines(lines: dict[str, pd.DataFrame], column: str = "allocated_bytes") -> go.Figure:
    """One line per run of `column` against the step-aligned x each frame carries (column x)."""
    lines = {k: v for k, v in lines.items() if len(v)}
    if not lines:
        return empty_figure("Timelines aligned by step")
    unit = byte_unit(*(d[column] for d in lines.values()))
    fig = go.Figure(
        [
            go.Scattergl(
                x=d["x"],
                y=in_unit(d[column], unit[1]),
                mode="lines",
                name=name,
                customdata=d[column].astype("float").to_numpy(),
                hovertemplate=f"{name}: %{{y:.3f}} {unit[0]} (%{{customdata:,.0f}} B)"
                " at step %{x:.2f}<extra></extra>",
            )
            for name, d in lines.items()
        ]
    )
    integer_ticks(fig, max(float(np.nanmax(d["x"])) if d["x"].notna().any() else 0 for d in lines.values()))
    fig = with_layout(fig, f"{SERIES_NAMES.get(column, column)} bytes, aligned by step", "step", unit[0])
    return mark_unit(fig.update_layout(hovermode="closest"), unit)


def diff_bar(diff: pd.DataFrame, key: str, top: int = 25) -> go.Figure:
    """compare_modules / compare_categories: b - a bytes per key, largest changes."""
    d = diff[diff["delta_bytes"] != 0].head(top).iloc[::-1]
    if d.empty:
        return empty_figure(f"Difference by {key}", "no differences")
    unit = byte_unit(d["delta_bytes"])
    colors = np.where(d["delta_bytes"] > 0, "#d62728", "#2ca02c")
    fig = go.Figure(
        go.Bar(
            x=in_unit(d["delta_bytes"], unit[1]),
            y=[str(k) if k else "(root)" for k in d[key]],
            orientation="h",
            marker_color=colors,
            name="b - a",
            customdata=d["delta_bytes"].to_numpy(),
            hovertemplate="%{y}: %{customdata:+,} B<extra></extra>",
        )
    )
    fig = with_layout(fig, f"Difference by {key} (b - a; red: b holds more)", unit[0], key)
    return mark_unit(fig.update_layout(hovermode="closest"), unit)
