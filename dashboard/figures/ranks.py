"""The Ranks page: each rank's peak, timeline and categories, side by side."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from dashboard.figures.base import byte_unit, empty_figure, in_unit, integer_ticks, mark_unit, with_layout


def rank_peaks(table: pd.DataFrame, skew: dict) -> go.Figure:
    """analysis.ranks.rank_table_of: each rank's peak allocated bytes (the allocator's), the largest in red,
    the median of the ranks' peaks as a dashed line; ranks without a peak are left out."""
    title = "Peak allocated per rank"
    d = table[table["peak_allocated_bytes"].notna()]
    if d.empty:
        return empty_figure(title, "no rank could be read")
    peaks = d["peak_allocated_bytes"].to_numpy(dtype=np.int64)
    colors = np.where(d["is_max"].to_numpy(dtype=bool), "#d62728", "#1f77b4")
    unit = byte_unit(peaks)
    fig = go.Figure(
        go.Bar(
            x=d["rank"].to_numpy(),
            y=peaks / unit[1],
            marker_color=colors,
            name="peak allocated",
            customdata=np.stack([peaks, d["skew_pct"].to_numpy(dtype=float)], axis=1),
            hovertemplate="rank %{x}: %{customdata[0]:,.0f} B "
            "(%{customdata[1]:+.2f}% against the median)<extra></extra>",
        )
    )
    if skew.get("median_bytes") is not None:
        median = skew["median_bytes"] / unit[1]
        fig.update_layout(
            shapes=[
                dict(
                    type="line",
                    xref="paper",
                    x0=0,
                    x1=1,
                    yref="y",
                    y0=median,
                    y1=median,
                    line=dict(color="grey", dash="dash", width=1),
                )
            ],
            annotations=[
                dict(
                    text="median",
                    xref="paper",
                    x=1,
                    y=median,
                    yref="y",
                    showarrow=False,
                    xanchor="right",
                    yanchor="bottom",
                    font=dict(color="grey"),
                )
            ],
        )
    # Ranks are names, not quantities: a category axis labels each bar and leaves no gaps.
    fig.update_xaxes(type="category")
    return mark_unit(with_layout(fig, title, "rank", unit[0]).update_layout(hovermode="closest"), unit)


def rank_timelines(df: pd.DataFrame) -> go.Figure:
    """analysis.ranks.rank_timelines_of: allocated bytes of each rank against its step-aligned x, overlaid."""
    title = "Allocated bytes per rank, aligned by step"
    if df.empty:
        return empty_figure(title)
    unit = byte_unit(df["allocated_bytes"])
    fig = go.Figure(
        [
            go.Scattergl(
                x=g["x"],
                y=in_unit(g["allocated_bytes"], unit[1]),
                mode="lines",
                name=f"rank {rank}",
                customdata=g["allocated_bytes"].to_numpy(dtype=float),
                hovertemplate=f"%{{y:.3f}} {unit[0]} (%{{customdata:,.0f}} B)",
            )
            for rank, g in df.groupby("rank", sort=True)
        ]
    )
    integer_ticks(fig, float(df["x"].max()))
    return mark_unit(with_layout(fig, title, "step", unit[0]), unit)


def rank_categories(df: pd.DataFrame, categories: list[str]) -> go.Figure:
    """analysis.ranks.rank_categories_of: each rank's bytes at its own peak, stacked by category."""
    title = "Categories at each rank's peak"
    cats = [c for c in categories if c in df and (df[c] != 0).any()]
    if df.empty or not cats:
        return empty_figure(title)
    ranks = df["rank"].to_numpy()
    unit = byte_unit(df[cats].sum(axis=1))
    fig = go.Figure(
        [
            go.Bar(
                x=ranks,
                y=in_unit(df[c], unit[1]),
                name=c,
                customdata=df[c].to_numpy(dtype=float),
                hovertemplate=f"rank %{{x}} {c}: %{{customdata:,.0f}} B<extra></extra>",
            )
            for c in cats
        ]
    )
    fig.update_xaxes(type="category")
    fig = with_layout(fig.update_layout(barmode="stack"), title, "rank", unit[0]).update_layout(hovermode="closest")
    return mark_unit(fig, unit)
