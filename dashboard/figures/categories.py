"""The Categories page: allocated bytes by category over time and at the peak."""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go

from dashboard.figures.base import empty_figure, gib, with_layout


def category_area(ct: pd.DataFrame, categories: list[str]) -> go.Figure:
    """analysis.category_timeline as stacked areas (they sum to allocated bytes)."""
    cats = [c for c in categories if c in ct and (ct[c] != 0).any()]
    if ct.empty or not cats:
        return empty_figure("Allocated bytes by category")
    x = ct["event_index"].to_numpy()
    # Scattergl cannot stack; the caller downsamples (category_timeline's max_points).
    fig = go.Figure([go.Scatter(x=x, y=gib(ct[c]), name=c, mode="lines", stackgroup="one") for c in cats])
    return with_layout(fig, "Allocated bytes by category", "event index")


def category_peak_bar(at_peak: pd.DataFrame) -> go.Figure:
    """analysis.category_at_peak: bytes per category at the peak."""
    d = at_peak[at_peak["total_bytes"] != 0]
    if d.empty:
        return empty_figure("Categories at the peak")
    fig = go.Figure(
        go.Bar(
            x=d["category"],
            y=gib(d["total_bytes"]),
            name="at peak",
            customdata=d["total_bytes"].to_numpy(),
            hovertemplate="%{x}: %{customdata:,} B",
        )
    )
    return with_layout(fig, "Categories at the peak", "category").update_layout(hovermode="closest")
