"""The Layers page: bytes per module, as bars and over the module hierarchy."""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go

from dashboard.figures.base import empty_figure, gib, with_layout


def module_bar(table: pd.DataFrame, column: str, top: int = 30) -> go.Figure:
    """module_table's `column` per module, the `top` largest."""
    title = f"Modules by {column}"
    d = table[table[column] > 0].sort_values(column, ascending=False).head(top).iloc[::-1]
    if d.empty:
        return empty_figure(title)
    labels = [m if m else "(root)" for m in d["module"]]
    fig = go.Figure(
        go.Bar(
            x=gib(d[column]),
            y=labels,
            orientation="h",
            name=column,
            customdata=d[column].to_numpy(),
            hovertemplate="%{y}: %{customdata:,} B",
        )
    )
    return with_layout(fig, title, "GiB", "module").update_layout(hovermode="closest", height=max(400, 18 * len(d)))


def module_tree(rolled: pd.DataFrame, column: str, kind: str = "treemap") -> go.Figure:
    """A treemap or icicle over the module hierarchy of modules.rollup(table), sized by subtree_<column>."""
    title = f"Module hierarchy by {column}"
    value = f"subtree_{column}"
    d = rolled[rolled[value] > 0]
    if d.empty:
        return empty_figure(title)
    known = set(d["module"])
    ids = [m if m else "(root)" for m in d["module"]]
    parents = [("(root)" if p == "" else p) if isinstance(p, str) and p in known else "" for p in d["parent"]]
    parents = ["" if i == p else p for i, p in zip(ids, parents)]
    cls = go.Icicle if kind == "icicle" else go.Treemap
    fig = go.Figure(
        cls(
            ids=ids,
            labels=[i.rsplit(".", 1)[-1] for i in ids],
            parents=parents,
            values=d[value].to_numpy(),
            branchvalues="total",
            hovertemplate="%{id}: %{value:,} B<extra></extra>",
        )
    )
    return fig.update_layout(title=title, margin=dict(t=50, l=10, r=10, b=10))
