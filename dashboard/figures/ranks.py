"""The Ranks page: each rank's peak, timeline and categories, side by side."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from dashboard.figures.base import GIB, empty_figure, gib, with_layout


def rank_peaks(table: pd.DataFrame, skew: dict) -> go.Figure:
    """analysis.ranks.rank_table_of: each rank's peak allocated bytes (the allocator's), the largest in red,
    the median of the ranks' peaks as a dashed line; ranks without a peak are left out."""
    title = "Peak allocated per rank"
    d = table[table["peak_allocated_bytes"].notna()]
    if d.empty:
        return empty_figure(title, "no rank could be read")
    peaks = d["peak_allocated_bytes"].to_numpy(dtype=np.int64)
    colors = np.where(d["is_max"].to_numpy(dtype=bool), "#d62728", "#1f77b4")
    fig = go.Figure(
        go.Bar(
            x=d["rank"].to_numpy(),
            y=peaks / GIB,
            marker_color=colors,
            name="peak allocated",
            customdata=np.stack([peaks, d["skew_pct"].to_numpy(dtype=float)], axis=1),
            hovertemplate="rank %{x}: %{customdata[0]:,.0f} B "
            "(%{customdata[1]:+.2f}% against the median)<extra></extra>",
        )
    )
    if skew.get("median_bytes") is not None:
        median = skew["median_bytes"] / GIB
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
    return with_layout(fig, title, "rank").update_layout(hovermode="closest")


def rank_timelines(df: pd.DataFrame) -> go.Figure:
    """analysis.ranks.rank_timelines_of: allocated bytes of each rank against its step-aligned x, overlaid."""
    title = "Allocated bytes per rank, aligned by step"
    if df.empty:
        return empty_figure(title)
    fig = go.Figure(
        [
            go.Scattergl(
                x=g["x"],
                y=gib(g["allocated_bytes"]),
                mode="lines",
                name=f"rank {rank}",
                customdata=g["allocated_bytes"].to_numpy(dtype=float),
                hovertemplate="%{y:.3f} GiB (%{customdata:,.0f} B)",
            )
            for rank, g in df.groupby("rank", sort=True)
        ]
    )
    return with_layout(fig, title, "step")


def rank_categories(df: pd.DataFrame, categories: list[str]) -> go.Figure:
    """analysis.ranks.rank_categories_of: each rank's bytes at its own peak, stacked by category."""
    title = "Categories at each rank's peak"
    cats = [c for c in categories if c in df and (df[c] != 0).any()]
    if df.empty or not cats:
        return empty_figure(title)
    ranks = df["rank"].to_numpy()
    fig = go.Figure(
        [
            go.Bar(
                x=ranks,
                y=gib(df[c]),
                name=c,
                customdata=df[c].to_numpy(dtype=float),
                hovertemplate=f"rank %{{x}} {c}: %{{customdata:,.0f}} B<extra></extra>",
            )
            for c in cats
        ]
    )
    fig.update_xaxes(type="category")
    return with_layout(fig.update_layout(barmode="stack"), title, "rank").update_layout(hovermode="closest")
