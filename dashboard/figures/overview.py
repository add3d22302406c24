"""The Overview page: memory over time, what is alive by one key, and the allocator's counters."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from dashboard.figures.base import GIB, empty_figure, gib, with_layout

SERIES = (("allocated_bytes", "allocated"), ("active_bytes", "active"), ("reserved_bytes", "reserved"))
MAX_SPANS = 200  # phase rectangles beyond this make a figure slow to draw and unreadable
PHASE_FILLS = {
    "forward": "rgba(31,119,180,0.07)",
    "backward": "rgba(214,39,40,0.07)",
    "optimizer": "rgba(44,160,44,0.07)",
    "recompute": "rgba(148,103,189,0.07)",
}


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
        return empty_figure("Memory over time")
    fig = go.Figure()
    for trace in _series_traces(tl):
        fig.add_trace(trace)
    if peak is not None and peak.event_index >= 0:
        fig.add_trace(_peak_trace(peak))
    # Shapes go in with one layout update: add_vline/add_vrect re-validate every
    # existing shape on each call, which is quadratic in the number of steps.
    fig.update_layout(shapes=_span_shapes(steps, phases, marker))
    return with_layout(fig, "Memory over time", "event index")


def _series_traces(tl: pd.DataFrame) -> list[go.Scattergl]:
    """One line per counter in SERIES that the timeline has."""
    x = tl["event_index"].to_numpy()
    return [
        go.Scattergl(
            x=x,
            y=gib(tl[col]),
            mode="lines",
            name=name,
            customdata=tl[col].astype("float").to_numpy(),
            hovertemplate="%{y:.3f} GiB (%{customdata:,.0f} B)",
        )
        for col, name in SERIES
        if col in tl and tl[col].notna().any()
    ]


def _peak_trace(peak) -> go.Scattergl:
    return go.Scattergl(
        x=[peak.event_index],
        y=[peak.allocated_bytes / GIB],
        mode="markers",
        name="peak",
        marker=dict(size=12, symbol="star", color="red"),
        customdata=[peak.allocated_bytes],
        hovertemplate="peak %{customdata:,} B",
    )


def _span_shapes(steps: pd.DataFrame | None, phases: pd.DataFrame | None, marker: int | None) -> list[dict]:
    """Step boundaries as dotted lines, phases as bands (each only up to MAX_SPANS), `marker` as a line."""
    shapes = []
    if steps is not None and len(steps) <= MAX_SPANS:
        shapes += [_vline(s.event_index_start, color="grey", dash="dot") for s in steps.itertuples()]
    if phases is not None and len(phases) <= MAX_SPANS:
        shapes += [_phase_band(p.event_index_start, p.event_index_end, str(p.phase)) for p in phases.itertuples()]
    if marker is not None:
        shapes.append(_vline(marker, color="black"))
    return shapes


def _phase_band(start, end, phase: str) -> dict:
    return dict(
        type="rect",
        xref="x",
        yref="paper",
        x0=start,
        x1=end,
        y0=0,
        y1=1,
        line_width=0,
        layer="below",
        fillcolor=PHASE_FILLS.get(phase, "rgba(0,0,0,0.04)"),
    )


def _vline(x, color: str, dash: str | None = None) -> dict:
    return dict(type="line", xref="x", yref="paper", x0=x, x1=x, y0=0, y1=1, line=dict(color=color, width=1, dash=dash))


def breakdown_bar(df: pd.DataFrame, by: str, title: str | None = None, top: int = 20) -> go.Figure:
    """Horizontal bars of analysis.breakdown(...): bytes per `by` value, largest on top."""
    title = title or f"Alive by {by}"
    if df.empty:
        return empty_figure(title)
    d = df.head(top).iloc[::-1]
    labels = [str(v) if v is not None else "(none)" for v in d[by]]
    fig = go.Figure(
        go.Bar(
            x=gib(d["total_bytes"]),
            y=labels,
            orientation="h",
            name=by,
            customdata=np.stack([d["total_bytes"].to_numpy(), d["count"].to_numpy()], axis=1),
            hovertemplate="%{y}: %{customdata[0]:,} B in %{customdata[1]} blocks",
        )
    )
    return with_layout(fig, title, "GiB", by).update_layout(hovermode="closest")


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
        return empty_figure("Allocator counters per step")
    fig = go.Figure([go.Scatter(x=steps["step"], y=gib(steps[c]), mode="lines+markers", name=c) for c in cols])
    return with_layout(fig, "Allocator counters per step", "step")
