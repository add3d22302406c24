"""Plotly figure builders: DataFrames in (as profiler.analysis returns them), a go.Figure out.

Nothing here reads a trace or touches Streamlit, so that every chart is tested on its own.
Bytes stay bytes in the data; the axes show them in binary units (GiB) only for reading.
Long lines are drawn with Scattergl (WebGL); the caller downsamples them first.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

GIB = float(1 << 30)
SERIES = (("allocated_bytes", "allocated"), ("active_bytes", "active"), ("reserved_bytes", "reserved"))
STATE_COLORS = {"active_allocated": "#1f77b4", "active_pending_free": "#ff7f0e", "inactive": "#d9d9d9"}
MAX_SPANS = 200  # phase rectangles beyond this make a figure slow to draw and unreadable


def _gib(values) -> np.ndarray:
    return pd.to_numeric(pd.Series(values), errors="coerce").to_numpy(dtype=float) / GIB


def _empty(title: str, note: str = "nothing to show") -> go.Figure:
    fig = go.Figure()
    fig.update_layout(
        title=title, annotations=[dict(text=note, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper")]
    )
    return fig


def _layout(fig: go.Figure, title: str, x: str, y: str = "GiB") -> go.Figure:
    fig.update_layout(
        title=title,
        xaxis_title=x,
        yaxis_title=y,
        hovermode="x unified",
        legend=dict(orientation="h", y=-0.2),
        margin=dict(t=50, l=10, r=10),
    )
    return fig


# -- Overview -----------------------------------------------------------------------------


def memory_timeline(
    tl: pd.DataFrame,
    peak=None,
    steps: pd.DataFrame | None = None,
    phases: pd.DataFrame | None = None,
    marker: int | None = None,
) -> go.Figure:
    """Allocated / active / reserved GiB against event index, step boundaries as lines, phase
    spans as shaded bands, the peak (an analysis.Peak) as a point and `marker` as a line."""
    if tl.empty:
        return _empty("Memory over time")
    fig = go.Figure()
    x = tl["event_index"].to_numpy()
    for col, name in SERIES:
        if col in tl and tl[col].notna().any():
            fig.add_trace(
                go.Scattergl(
                    x=x,
                    y=_gib(tl[col]),
                    mode="lines",
                    name=name,
                    customdata=tl[col].astype("float").to_numpy(),
                    hovertemplate="%{y:.3f} GiB (%{customdata:,.0f} B)",
                )
            )
    if peak is not None and peak.event_index >= 0:
        fig.add_trace(
            go.Scattergl(
                x=[peak.event_index],
                y=[peak.allocated_bytes / GIB],
                mode="markers",
                name="peak",
                marker=dict(size=12, symbol="star", color="red"),
                customdata=[peak.allocated_bytes],
                hovertemplate="peak %{customdata:,} B",
            )
        )
    # Shapes go in with one layout update: add_vline/add_vrect re-validate every
    # existing shape on each call, which is quadratic in the number of steps.
    shapes = []
    if steps is not None and len(steps) <= MAX_SPANS:
        shapes += [_vline(s.event_index_start, color="grey", dash="dot") for s in steps.itertuples()]
    if phases is not None and len(phases) <= MAX_SPANS:
        palette = {
            "forward": "rgba(31,119,180,0.07)",
            "backward": "rgba(214,39,40,0.07)",
            "optimizer": "rgba(44,160,44,0.07)",
            "recompute": "rgba(148,103,189,0.07)",
        }
        shapes += [
            dict(
                type="rect",
                xref="x",
                yref="paper",
                x0=p.event_index_start,
                x1=p.event_index_end,
                y0=0,
                y1=1,
                line_width=0,
                layer="below",
                fillcolor=palette.get(str(p.phase), "rgba(0,0,0,0.04)"),
            )
            for p in phases.itertuples()
        ]
    if marker is not None:
        shapes.append(_vline(marker, color="black"))
    fig.update_layout(shapes=shapes)
    return _layout(fig, "Memory over time", "event index")


def _vline(x, color: str, dash: str | None = None) -> dict:
    return dict(type="line", xref="x", yref="paper", x0=x, x1=x, y0=0, y1=1, line=dict(color=color, width=1, dash=dash))


def breakdown_bar(df: pd.DataFrame, by: str, title: str | None = None, top: int = 20) -> go.Figure:
    """Horizontal bars of analysis.breakdown(...): bytes per `by` value, largest on top."""
    title = title or f"Alive by {by}"
    if df.empty:
        return _empty(title)
    d = df.head(top).iloc[::-1]
    labels = [str(v) if v is not None else "(none)" for v in d[by]]
    fig = go.Figure(
        go.Bar(
            x=_gib(d["total_bytes"]),
            y=labels,
            orientation="h",
            name=by,
            customdata=np.stack([d["total_bytes"].to_numpy(), d["count"].to_numpy()], axis=1),
            hovertemplate="%{y}: %{customdata[0]:,} B in %{customdata[1]} blocks",
        )
    )
    return _layout(fig, title, "GiB", by).update_layout(hovermode="closest")


def allocator_counters(steps: pd.DataFrame) -> go.Figure:
    """The steps table's memory_stats() counters per step, as the allocator reported them."""
    cols = [
        c
        for c in (
            "allocated_bytes",
            "active_bytes",
            "reserved_bytes",
            "inactive_split_bytes",
            "max_allocated_bytes",
            "max_reserved_bytes",
        )
        if c in steps and steps[c].notna().any()
    ]
    if steps.empty or not cols:
        return _empty("Allocator counters per step")
    fig = go.Figure([go.Scatter(x=steps["step"], y=_gib(steps[c]), mode="lines+markers", name=c) for c in cols])
    return _layout(fig, "Allocator counters per step", "step")


# -- Layers ---------------------------------------------------------------------------


def module_bar(table: pd.DataFrame, column: str, top: int = 30) -> go.Figure:
    """module_table's `column` per module, the `top` largest."""
    title = f"Modules by {column}"
    d = table[table[column] > 0].sort_values(column, ascending=False).head(top).iloc[::-1]
    if d.empty:
        return _empty(title)
    labels = [m if m else "(root)" for m in d["module"]]
    fig = go.Figure(
        go.Bar(
            x=_gib(d[column]),
            y=labels,
            orientation="h",
            name=column,
            customdata=d[column].to_numpy(),
            hovertemplate="%{y}: %{customdata:,} B",
        )
    )
    return _layout(fig, title, "GiB", "module").update_layout(hovermode="closest", height=max(400, 18 * len(d)))


def module_tree(rolled: pd.DataFrame, column: str, kind: str = "treemap") -> go.Figure:
    """A treemap or icicle over the module hierarchy of modules.rollup(table), sized by subtree_<column>."""
    title = f"Module hierarchy by {column}"
    value = f"subtree_{column}"
    d = rolled[rolled[value] > 0]
    if d.empty:
        return _empty(title)
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


# -- Categories -------------------------------------------------------------------------


def category_area(ct: pd.DataFrame, categories: list[str]) -> go.Figure:
    """analysis.category_timeline as stacked areas (they sum to allocated bytes)."""
    cats = [c for c in categories if c in ct and (ct[c] != 0).any()]
    if ct.empty or not cats:
        return _empty("Allocated bytes by category")
    x = ct["event_index"].to_numpy()
    # Scattergl cannot stack; the caller downsamples (category_timeline's max_points).
    fig = go.Figure([go.Scatter(x=x, y=_gib(ct[c]), name=c, mode="lines", stackgroup="one") for c in cats])
    return _layout(fig, "Allocated bytes by category", "event index")


def category_peak_bar(at_peak: pd.DataFrame) -> go.Figure:
    """analysis.category_at_peak: bytes per category at the peak."""
    d = at_peak[at_peak["total_bytes"] != 0]
    if d.empty:
        return _empty("Categories at the peak")
    fig = go.Figure(
        go.Bar(
            x=d["category"],
            y=_gib(d["total_bytes"]),
            name="at peak",
            customdata=d["total_bytes"].to_numpy(),
            hovertemplate="%{x}: %{customdata:,} B",
        )
    )
    return _layout(fig, "Categories at the peak", "category").update_layout(hovermode="closest")


# -- Fragmentation ----------------------------------------------------------------------


def fragmentation_lines(frag: pd.DataFrame) -> go.Figure:
    """analysis.fragmentation: byte series in GiB, the ratio on a second axis."""
    d = frag[frag["reserved_bytes"].notna()] if len(frag) else frag
    if d.empty:
        return _empty("Fragmentation", "no allocator segments (CPU backend)")
    x = d["event_index"].astype(float).to_numpy()
    fig = go.Figure(
        [
            go.Scatter(x=x, y=_gib(d[c]), name=c, mode="lines+markers")
            for c in ("reserved_minus_allocated_bytes", "inactive_split_bytes", "largest_free_block_bytes")
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
    return _layout(fig, "Fragmentation", "event index")


def segment_map(layout: pd.DataFrame, color_by: str = "state") -> go.Figure:
    """analysis.segment_map_at: one bar per segment, its blocks stacked by address, coloured
    by state or category."""
    if layout.empty:
        return _empty("Segment map", "no segments at this moment")
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
                customdata=np.stack([g["block_addr"].to_numpy(), g["size_bytes"].to_numpy()], axis=1),
                hovertemplate="0x%{customdata[0]:x}: %{customdata[1]:,} B",
            )
        )
    fig.update_layout(barmode="overlay", height=max(300, 22 * len(seg_ids)))
    return _layout(fig, "Segment map", "MiB from segment start", "segment").update_layout(hovermode="closest")


# -- KV cache ---------------------------------------------------------------------------


def kv_growth(kvs: dict[str, pd.DataFrame], token_bytes: float | None = None) -> go.Figure:
    """Token-state and reserved bytes against batch x tokens per run, and the formula's line
    (token_bytes per token position)."""
    kvs = {k: v for k, v in kvs.items() if len(v)}
    if not kvs:
        return _empty("KV cache growth", "no kv rows")
    fig = go.Figure()
    for name, kv in kvs.items():
        fig.add_trace(
            go.Scatter(
                x=kv["tokens_total"], y=_gib(kv["token_state_bytes"]), mode="markers", name=f"{name} token-state"
            )
        )
        fig.add_trace(
            go.Scatter(x=kv["tokens_total"], y=_gib(kv["reserved_bytes"]), mode="lines", name=f"{name} reserved")
        )
    if token_bytes:
        top = max(int(v["tokens_total"].max()) for v in kvs.values())
        fig.add_trace(
            go.Scatter(
                x=[0, top],
                y=[0, top * token_bytes / GIB],
                mode="lines",
                name="formula",
                line=dict(color="black", dash="dash"),
            )
        )
    return _layout(fig, "KV cache bytes against tokens", "token positions (batch x tokens)")


def kv_waste(waste: pd.DataFrame) -> go.Figure:
    """analysis.kv.kv_waste: stacked mean bytes per run and cache: token-state, unused, extra."""
    if waste.empty:
        return _empty("KV waste by cache variant")
    labels = [f"{r} / {c}" for r, c in zip(waste["run"], waste["cache"])]
    fig = go.Figure(
        [go.Bar(x=labels, y=_gib(waste[c]), name=c) for c in ("token_state_bytes", "unused_bytes", "extra_bytes")]
    )
    return _layout(fig.update_layout(barmode="stack"), "KV bytes by use (mean over steps)", "run / cache")


# -- Compare ----------------------------------------------------------------------------


def overlay_timelines(lines: dict[str, pd.DataFrame], column: str = "allocated_bytes") -> go.Figure:
    """One line per run of `column` against the step-aligned x each frame carries (column x)."""
    lines = {k: v for k, v in lines.items() if len(v)}
    if not lines:
        return _empty("Timelines aligned by step")
    fig = go.Figure([go.Scattergl(x=d["x"], y=_gib(d[column]), mode="lines", name=name) for name, d in lines.items()])
    return _layout(fig, f"{column} aligned by step", "step")


def diff_bar(diff: pd.DataFrame, key: str, top: int = 25) -> go.Figure:
    """compare_modules / compare_categories: b - a bytes per key, largest changes."""
    d = diff[diff["delta_bytes"] != 0].head(top).iloc[::-1]
    if d.empty:
        return _empty(f"Difference by {key}", "no differences")
    colors = np.where(d["delta_bytes"] > 0, "#d62728", "#2ca02c")
    fig = go.Figure(
        go.Bar(
            x=_gib(d["delta_bytes"]),
            y=[str(k) if k else "(root)" for k in d[key]],
            orientation="h",
            marker_color=colors,
            name="b - a",
            customdata=d["delta_bytes"].to_numpy(),
            hovertemplate="%{y}: %{customdata:+,} B",
        )
    )
    return _layout(fig, f"Difference by {key} (b - a)", "GiB", key).update_layout(hovermode="closest")


# -- Stacks -----------------------------------------------------------------------------


def stack_icicle(tree: pd.DataFrame) -> go.Figure:
    """analysis.stacks.stack_tree as an icicle: outermost frames on top, allocation sites at the leaves."""
    if tree.empty:
        return _empty("Allocation sites at the peak")
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
        return _empty(title)
    fig = go.Figure()
    for col, name in (("measured_bytes", "measured"), ("predicted_bytes", "predicted")):
        fig.add_trace(
            go.Bar(
                x=df["name"],
                y=_gib(df[col]),
                name=name,
                customdata=df[col].astype("float").to_numpy(),
                hovertemplate="%{y:.3f} GiB (%{customdata:,.0f} B)",
            )
        )
    fig.update_layout(barmode="group", yaxis_title="GiB")
    return _layout(fig, title, "category")


# -- Ranks ------------------------------------------------------------------------------


def rank_peaks(table: pd.DataFrame, skew: dict) -> go.Figure:
    """analysis.ranks.rank_table_of: each rank's peak allocated bytes (the allocator's), the largest in red,
    the median of the ranks' peaks as a dashed line; ranks without a peak are left out."""
    title = "Peak allocated per rank"
    d = table[table["peak_allocated_bytes"].notna()]
    if d.empty:
        return _empty(title, "no rank could be read")
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
    return _layout(fig, title, "rank").update_layout(hovermode="closest")


def rank_timelines(df: pd.DataFrame) -> go.Figure:
    """analysis.ranks.rank_timelines_of: allocated bytes of each rank against its step-aligned x, overlaid."""
    title = "Allocated bytes per rank, aligned by step"
    if df.empty:
        return _empty(title)
    fig = go.Figure(
        [
            go.Scattergl(
                x=g["x"],
                y=_gib(g["allocated_bytes"]),
                mode="lines",
                name=f"rank {rank}",
                customdata=g["allocated_bytes"].to_numpy(dtype=float),
                hovertemplate="%{y:.3f} GiB (%{customdata:,.0f} B)",
            )
            for rank, g in df.groupby("rank", sort=True)
        ]
    )
    return _layout(fig, title, "step")


def rank_categories(df: pd.DataFrame, categories: list[str]) -> go.Figure:
    """analysis.ranks.rank_categories_of: each rank's bytes at its own peak, stacked by category."""
    title = "Categories at each rank's peak"
    cats = [c for c in categories if c in df and (df[c] != 0).any()]
    if df.empty or not cats:
        return _empty(title)
    ranks = df["rank"].to_numpy()
    fig = go.Figure(
        [
            go.Bar(
                x=ranks,
                y=_gib(df[c]),
                name=c,
                customdata=df[c].to_numpy(dtype=float),
                hovertemplate=f"rank %{{x}} {c}: %{{customdata:,.0f}} B<extra></extra>",
            )
            for c in cats
        ]
    )
    fig.update_xaxes(type="category")
    return _layout(fig.update_layout(barmode="stack"), title, "rank").update_layout(hovermode="closest")
