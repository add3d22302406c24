"""The Layers page: bytes per module, as bars and over the module hierarchy."""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go

from dashboard.figures.base import byte_unit, empty_figure, in_unit, mark_unit, with_layout

COLUMN_NAMES = {
    "peak_contribution_bytes": "bytes alive at the peak",
    "retained_bytes": "bytes kept after forward",
    "forward_alloc_bytes": "bytes allocated in forward",
    "backward_alloc_bytes": "bytes allocated in backward",
    "recompute_alloc_bytes": "bytes allocated recomputing",
    "param_bytes": "parameter bytes",
}


def module_bar(parts: pd.DataFrame, column: str, top: int = 30) -> go.Figure:
    """The `top` largest holders of modules.module_parts: each module's own bytes (a module with
    children shows what its own forward computed as "<Class>.forward itself") and the bytes in
    no module, by category."""
    title = f"Modules by {COLUMN_NAMES.get(column, column)}"
    parents = set(parts["parent"]) if len(parts) else set()
    d = parts[~parts["id"].isin(parents)] if len(parts) else parts
    d = d[d["bytes"] > 0].sort_values("bytes", ascending=False).head(top).iloc[::-1]
    if d.empty:
        return empty_figure(title)
    unit = byte_unit(d["bytes"])
    labels = [
        f"(in no module) {label}" if kind == "remainder" else label if kind == "itself" else i
        for i, label, kind in zip(d["id"], d["label"], d["kind"])
    ]
    fig = go.Figure(
        go.Bar(
            x=in_unit(d["bytes"], unit[1]),
            y=labels,
            orientation="h",
            name=column,
            customdata=d["bytes"].to_numpy(),
            hovertemplate="%{y}: %{customdata:,} B<extra></extra>",
        )
    )
    fig.update_yaxes(automargin=True)
    fig = with_layout(fig, title, unit[0], "module")
    return mark_unit(fig.update_layout(hovermode="closest", height=max(400, 20 * len(d))), unit)


def module_tree(parts: pd.DataFrame, column: str, kind: str = "treemap") -> go.Figure:
    """A treemap or icicle of modules.module_parts: every box labelled, the root's own bytes and
    the bytes in no module included, so that the boxes add up."""
    title = f"Module hierarchy by {COLUMN_NAMES.get(column, column)}"
    if parts.empty:
        return empty_figure(title)
    cls = go.Icicle if kind == "icicle" else go.Treemap
    fig = go.Figure(
        cls(
            ids=parts["id"],
            labels=parts["label"],
            parents=parts["parent"],
            values=parts["bytes"].to_numpy(),
            branchvalues="total",
            hovertemplate="%{id}: %{value:,} B (%{percentRoot:.1%})<extra></extra>",
            texttemplate="%{label}<br>%{percentRoot:.1%}",
        )
    )
    return fig.update_layout(title=title, margin=dict(t=50, l=10, r=10, b=10))
