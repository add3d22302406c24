"""The Stacks and Estimate pages: allocation sites at the peak, and measured against predicted bytes."""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go

from dashboard.figures.base import empty_figure, gib, with_layout


def stack_icicle(tree: pd.DataFrame) -> go.Figure:
    """analysis.stacks.stack_tree as an icicle: outermost frames on top, allocation sites at the leaves."""
    if tree.empty:
        return empty_figure("Allocation sites at the peak")
    fig = go.Figure(
        go.Icicle(
            ids=tree["id"],
            parents=tree["parent"],
            labels=tree["label"],
            values=tree["bytes"],
            branchvalues="total",
            hovertemplate="%{label}: %{value:,} B<extra></extra>",
        )
    )
    return fig.update_layout(title="Allocation sites at the peak", margin=dict(t=50, l=10, r=10, b=10))


def measured_vs_predicted(df: pd.DataFrame) -> go.Figure:
    """Grouped bars per category: measured bytes at the peak and the analytic prediction."""
    title = "Measured vs predicted at the peak"
    if df.empty:
        return empty_figure(title)
    fig = go.Figure()
    for col, name in (("measured_bytes", "measured"), ("predicted_bytes", "predicted")):
        fig.add_trace(
            go.Bar(
                x=df["name"],
                y=gib(df[col]),
                name=name,
                customdata=df[col].astype("float").to_numpy(),
                hovertemplate="%{y:.3f} GiB (%{customdata:,.0f} B)",
            )
        )
    fig.update_layout(barmode="group", yaxis_title="GiB")
    return with_layout(fig, title, "category")
