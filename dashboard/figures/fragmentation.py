"""The Fragmentation page: the allocator's slack at every step end and one moment's segment map."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from dashboard.figures.base import byte_unit, empty_figure, integer_ticks, mark_unit, with_layout

STATE_COLORS = {"active_allocated": "#1f77b4", "active_pending_free": "#ff7f0e", "inactive": "#d9d9d9"}


def slack_panels(by_step: pd.DataFrame, names: dict[str, str]) -> go.Figure:
    """analysis.slack_by_step: one panel per quantity in `names` (column: name) that the run
    recorded, over the step ends; bytes in one unit that suits them all, exact bytes on hover,
    retries as counts."""
    shown = [c for c in names if c in by_step and by_step[c].notna().any()]
    if by_step.empty or not shown:
        return empty_figure("Slack at every step end", "no allocator counters per step in this run")
    byte_columns = [c for c in shown if c.endswith("_bytes")]
    unit = byte_unit(*(by_step[c] for c in byte_columns))
    fig = make_subplots(rows=len(shown), cols=1, shared_xaxes=True, subplot_titles=[names[c] for c in shown])
    steps = by_step["step"].astype("int64").to_numpy()
    for row, c in enumerate(shown, start=1):
        exact = by_step[c].astype("Float64").to_numpy(dtype=float, na_value=np.nan)
        is_bytes = c in byte_columns
        fig.add_trace(
            go.Scatter(
                x=steps,
                y=exact / unit[1] if is_bytes else exact,
                name=names[c],
                mode="lines+markers",
                customdata=exact,
                hovertemplate=f"step %{{x}}: %{{customdata:,.0f}}{' B' if is_bytes else ''}<extra>{names[c]}</extra>",
            ),
            row=row,
            col=1,
        )
        fig.update_yaxes(title_text=unit[0] if is_bytes else "count", rangemode="tozero", row=row, col=1)
    fig.update_xaxes(title_text="step", row=len(shown), col=1)
    fig.update_layout(height=180 * len(shown) + 80, showlegend=False, title="Slack at every step end")
    fig.update_layout(margin=dict(t=60, l=10, r=10), hovermode="closest")
    return mark_unit(integer_ticks(fig, int(steps.max()) if len(steps) else None), unit)


OWNER = ("category", "module", "phase", "site")  # shown on a block's hover, where the layout has them


def _shown(g: pd.DataFrame, column: str) -> np.ndarray:
    if column not in g:
        return np.full(len(g), "", dtype=object)
    return g[column].astype(object).where(g[column].notna(), "").to_numpy()


def segment_map(layout: pd.DataFrame, color_by: str = "state") -> go.Figure:
    """analysis.segment_map_at: one bar per segment, its blocks stacked by address, coloured
    by state or category; a block's hover gives its size, address and (data.blocks_with_owners)
    category, module, phase and allocation site."""
    if layout.empty:
        return empty_figure("Segment map", "no segments at this moment")
    d = layout.copy()
    seg_ids = {a: f"seg {i} @0x{int(a):x}" for i, a in enumerate(pd.unique(d["segment_addr"]))}
    d["segment"] = d["segment_addr"].map(seg_ids)
    d["key"] = d[color_by].astype(object).where(d[color_by].notna(), "free" if color_by == "category" else "?")
    fig = go.Figure()
    for key, g in d.groupby("key", sort=True):
        fig.add_trace(
            go.Bar(
                y=g["segment"],
                x=g["size_bytes"] / (1 << 20),
                base=(g["block_addr"] - g["segment_addr"]) / (1 << 20),
                orientation="h",
                name=str(key),
                marker_color=STATE_COLORS.get(str(key)),
                customdata=np.stack(
                    [g["block_addr"].to_numpy(), g["size_bytes"].to_numpy()] + [_shown(g, c) for c in OWNER],
                    axis=1,
                ),
                hovertemplate="%{customdata[1]:,} B at 0x%{customdata[0]:x}<br>"
                + "<br>".join(f"{c}: %{{customdata[{i + 2}]}}" for i, c in enumerate(OWNER))
                + "<extra></extra>",
            )
        )
    # The first segment in `layout` (the most free bytes, when ranked) is drawn at the top.
    fig.update_yaxes(categoryorder="array", categoryarray=list(seg_ids.values())[::-1])
    fig.update_layout(barmode="overlay", height=max(300, 22 * len(seg_ids)))
    return with_layout(fig, "Segment map", "MiB from segment start", "segment").update_layout(hovermode="closest")
