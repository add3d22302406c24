"""The Categories page: allocated bytes by category over time and at the peak."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from dashboard.figures.base import TIME_AXES, byte_unit, empty_figure, in_unit, integer_ticks, mark_unit, with_layout


def category_area(ct: pd.DataFrame, categories: list[str], x_of=None, axis: str = "events") -> go.Figure:
    """analysis.category_timeline as stacked areas (they sum to allocated bytes); x_of maps event
    indices to the x drawn, as `axis` names it (figures.base.TIME_AXES)."""
    cats = [c for c in categories if c in ct and (ct[c] != 0).any()]
    if ct.empty or not cats:
        return empty_figure("Allocated bytes by category")
    index = ct["event_index"].to_numpy()
    x = x_of(index) if x_of is not None else index
    unit = byte_unit(ct[cats].sum(axis=1))
    # Scattergl cannot stack; the caller downsamples (category_timeline's max_points).
    fig = go.Figure(
        [
            go.Scatter(
                x=x,
                y=in_unit(ct[c], unit[1]),
                name=c,
                mode="lines",
                stackgroup="one",
                customdata=ct[c].astype("float").to_numpy(),
                hovertemplate=f"{c}: %{{y:.3f}} {unit[0]} (%{{customdata:,.0f}} B)<extra></extra>",
            )
            for c in cats
        ]
    )
    if axis == "steps":
        integer_ticks(fig, float(np.nanmax(x)) if len(x) else None)
    return mark_unit(with_layout(fig, "Allocated bytes by category", TIME_AXES[axis], unit[0]), unit)


def category_peak_bar(at_peak: pd.DataFrame) -> go.Figure:
    """analysis.category_at_peak: bytes per category at the peak."""
    d = at_peak[at_peak["total_bytes"] != 0]
    if d.empty:
        return empty_figure("Categories at the peak")
    unit = byte_unit(d["total_bytes"])
    fig = go.Figure(
        go.Bar(
            x=d["category"],
            y=in_unit(d["total_bytes"], unit[1]),
            name="at peak",
            customdata=d["total_bytes"].to_numpy(),
            hovertemplate="%{x}: %{customdata:,} B<extra></extra>",
        )
    )
    return mark_unit(
        with_layout(fig, "Categories at the peak", "category", unit[0]).update_layout(hovermode="closest"), unit
    )
