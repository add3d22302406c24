"""The Compare page: runs' timelines overlaid by step, and where their bytes differ."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from dashboard.figures.base import empty_figure, gib, with_layout


def overlay_timelines(lines: dict[str, pd.DataFrame], column: str = "allocated_bytes") -> go.Figure:
    """One line per run of `column` against the step-aligned x each frame carries (column x)."""
    lines = {k: v for k, v in lines.items() if len(v)}
    if not lines:
        return empty_figure("Timelines aligned by step")
    fig = go.Figure([go.Scattergl(x=d["x"], y=gib(d[column]), mode="lines", name=name) for name, d in lines.items()])
    return with_layout(fig, f"{column} aligned by step", "step")


def diff_bar(diff: pd.DataFrame, key: str, top: int = 25) -> go.Figure:
    """compare_modules / compare_categories: b - a bytes per key, largest changes."""
    d = diff[diff["delta_bytes"] != 0].head(top).iloc[::-1]
    if d.empty:
        return empty_figure(f"Difference by {key}", "no differences")
    colors = np.where(d["delta_bytes"] > 0, "#d62728", "#2ca02c")
    fig = go.Figure(
        go.Bar(
            x=gib(d["delta_bytes"]),
            y=[str(k) if k else "(root)" for k in d[key]],
            orientation="h",
            marker_color=colors,
            name="b - a",
            customdata=d["delta_bytes"].to_numpy(),
            hovertemplate="%{y}: %{customdata:+,} B",
        )
    )
    return with_layout(fig, f"Difference by {key} (b - a)", "GiB", key).update_layout(hovermode="closest")
