"""The Fragmentation page: the allocator's slack over time and one moment's segment map."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from dashboard.figures.base import TIME_AXES, byte_unit, empty_figure, in_unit, mark_unit, with_layout

STATE_COLORS = {"active_allocated": "#1f77b4", "active_pending_free": "#ff7f0e", "inactive": "#d9d9d9"}


FRAGMENTATION_SERIES = {
    "reserved_minus_allocated_bytes": "reserved - allocated",
    "inactive_split_bytes": "inactive split",
    "largest_free_block_bytes": "largest free block",
}


def fragmentation_lines(frag: pd.DataFrame, x_of=None, axis: str = "events") -> go.Figure:
    """analysis.fragmentation: byte series in a unit that suits them, the ratio on a second axis;
    x_of maps event indices to the x drawn, as `axis` names it."""
    d = frag[frag["reserved_bytes"].notna()] if len(frag) else frag
    if d.empty:
        return empty_figure("Fragmentation", "no allocator segments (CPU backend)")
    index = d["event_index"].astype(float).to_numpy()
    x = x_of(d["event_index"].to_numpy(dtype="int64")) if x_of is not None else index
    unit = byte_unit(*(d[c] for c in FRAGMENTATION_SERIES))
    fig = go.Figure(
        [
            go.Scatter(
                x=x,
                y=in_unit(d[c], unit[1]),
                name=name,
                mode="lines+markers",
                customdata=d[c].astype("float").to_numpy(),
                hovertemplate=f"{name}: %{{customdata:,.0f}} B<extra></extra>",
            )
            for c, name in FRAGMENTATION_SERIES.items()
        ]
    )
    fig.add_trace(
        go.Scatter(
            x=x,
            y=d["fragmentation_ratio"],
            name="fragmentation_ratio",
            yaxis="y2",
            mode="lines+markers",
            line=dict(dash="dash"),
        )
    )
    fig.update_layout(yaxis2=dict(title="ratio", overlaying="y", side="right", range=[0, 1]))
    return mark_unit(with_layout(fig, "Fragmentation", TIME_AXES[axis], unit[0]), unit)


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
    fig.update_layout(barmode="overlay", height=max(300, 22 * len(seg_ids)))
    return with_layout(fig, "Segment map", "MiB from segment start", "segment").update_layout(hovermode="closest")
