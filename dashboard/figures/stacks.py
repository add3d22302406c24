"""The Stacks and Estimate pages: allocation sites at the peak, and measured against predicted bytes."""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go

from dashboard.figures.base import byte_unit, empty_figure, in_unit, mark_unit, with_layout


def stack_icicle(tree: pd.DataFrame) -> go.Figure:
    """analysis.stacks.stack_tree as an icicle: outermost frames on top, allocation sites at the
    leaves, each frame as "file.py:line function"."""
    if tree.empty:
        return empty_figure("Allocation sites at the peak")
    fig = go.Figure(
        go.Icicle(
            ids=tree["id"],
            parents=tree["parent"],
            labels=tree["label"],
            values=tree["bytes"],
            branchvalues="total",
            hovertemplate="%{label}: %{value:,} B (%{percentRoot:.1%} of these sites)<extra></extra>",
        )
    )
    return fig.update_layout(title="Allocation sites at the peak", margin=dict(t=50, l=10, r=10, b=10))


def measured_vs_predicted(df: pd.DataFrame) -> go.Figure:
    """Grouped bars per category: measured bytes at the peak and the analytic prediction."""
    title = "Measured vs predicted at the peak"
    if df.empty:
        return empty_figure(title)
    fig = go.Figure()
    unit = byte_unit(df["measured_bytes"], df["predicted_bytes"])
    for col, name in (("measured_bytes", "measured"), ("predicted_bytes", "predicted")):
        fig.add_trace(
            go.Bar(
                x=df["name"],
                y=in_unit(df[col], unit[1]),
                name=name,
                customdata=df[col].astype("float").to_numpy(),
                hovertemplate=f"%{{y:.3f}} {unit[0]} (%{{customdata:,.0f}} B)",
            )
        )
    fig.update_layout(barmode="group")
    return mark_unit(with_layout(fig, title, "category", unit[0]), unit)
