"""The Overview page: memory over time, what is alive by one key, and the allocator's counters."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from dashboard.figures.base import TIME_AXES, byte_unit, empty_figure, in_unit, integer_ticks, mark_unit, with_layout

SERIES = (("allocated_bytes", "allocated"), ("active_bytes", "active"), ("reserved_bytes", "reserved"))
# Drawn last and widest: allocated is the line the peak is on, and active often covers it.
LINE_STYLE = {
    "allocated_bytes": dict(width=2.5),
    "active_bytes": dict(width=1.5, dash="dot"),
    "reserved_bytes": dict(width=1.5),
}
NOTHING = {"module": "(in no module)", "stack_id": "(no stack)", "category": "(no category)"}
MAX_SPANS = 200  # phase rectangles beyond this make a figure slow to draw and unreadable
PHASE_FILLS = {
    "forward": "rgba(31,119,180,0.07)",
    "backward": "rgba(214,39,40,0.07)",
    "optimizer": "rgba(44,160,44,0.07)",
    "recompute": "rgba(148,103,189,0.07)",
}


def _events(idx):
    return np.asarray(idx, dtype=float)


def memory_timeline(
    tl: pd.DataFrame,
    peak=None,
    steps: pd.DataFrame | None = None,
    phases: pd.DataFrame | None = None,
    marker: int | None = None,
    x_of=_events,
    axis: str = "events",
) -> go.Figure:
    """Allocated / active / reserved bytes over time, step boundaries as lines, phase spans as
    shaded bands (with a legend entry each), the peak (an analysis.Peak) as a point and `marker`
    as a line. x_of maps event indices to the x drawn (seconds, step-aligned steps or the events
    themselves, as `axis` names). Every point carries its event index (customdata[1]), so that a
    click on it names a moment."""
    if tl.empty:
        return empty_figure("Memory over time")
    unit = byte_unit(*(tl[c] for c, _ in SERIES if c in tl))
    fig = go.Figure()
    x = x_of(tl["event_index"].to_numpy())
    for trace in _series_traces(tl, x, unit):
        fig.add_trace(trace)
    if peak is not None and peak.event_index >= 0:
        fig.add_trace(_peak_trace(peak, x_of, unit))
    for trace in _phase_legend(phases):
        fig.add_trace(trace)
    # Shapes go in with one layout update: add_vline/add_vrect re-validate every
    # existing shape on each call, which is quadratic in the number of steps.
    fig.update_layout(shapes=_span_shapes(steps, phases, marker, x_of))
    if axis == "steps":
        integer_ticks(fig, float(np.nanmax(x)) if len(x) else None)
    return mark_unit(with_layout(fig, "Memory over time", TIME_AXES[axis], unit[0]), unit)


def _series_traces(tl: pd.DataFrame, x, unit) -> list[go.Scattergl]:
    """One line per counter in SERIES that the timeline has."""
    index = tl["event_index"].to_numpy(dtype=float)
    return [
        go.Scattergl(
            x=x,
            y=in_unit(tl[col], unit[1]),
            mode="lines",
            name=name,
            line=LINE_STYLE[col],
            customdata=np.stack([tl[col].astype("float").to_numpy(), index], axis=1),
            hovertemplate=f"%{{y:.3f}} {unit[0]} (%{{customdata[0]:,.0f}} B) at event %{{customdata[1]:,}}",
        )
        for col, name in reversed(SERIES)
        if col in tl and tl[col].notna().any()
    ]


def _peak_trace(peak, x_of, unit) -> go.Scattergl:
    return go.Scattergl(
        x=x_of([peak.event_index]),
        y=[peak.allocated_bytes / unit[1]],
        mode="markers",
        name="peak",
        marker=dict(size=12, symbol="star", color="red"),
        customdata=[[peak.allocated_bytes, peak.event_index]],
        hovertemplate="peak %{customdata[0]:,} B at event %{customdata[1]:,}",
    )


def _phase_legend(phases: pd.DataFrame | None) -> list[go.Scatter]:
    """A legend entry per phase drawn as a band: the bands are shapes, which have none of their own."""
    if phases is None or phases.empty or len(phases) > MAX_SPANS:
        return []
    shown = [p for p in PHASE_FILLS if p in set(phases["phase"].astype(str))]
    return [
        go.Scatter(
            x=[None],
            y=[None],
            mode="markers",
            name=f"{p} phase",
            marker=dict(symbol="square", size=14, color=PHASE_FILLS[p].replace("0.07)", "0.35)")),
            hoverinfo="skip",
        )
        for p in shown
    ]


def _span_shapes(
    steps: pd.DataFrame | None, phases: pd.DataFrame | None, marker: int | None, x_of=_events
) -> list[dict]:
    """Step boundaries as dotted lines, phases as bands (each only up to MAX_SPANS), `marker` as a line."""
    shapes = []
    if steps is not None and len(steps) <= MAX_SPANS:
        shapes += [_vline(x, color="grey", dash="dot") for x in x_of(steps["event_index_start"].to_numpy())]
    if phases is not None and len(phases) <= MAX_SPANS:
        x0, x1 = x_of(phases["event_index_start"].to_numpy()), x_of(phases["event_index_end"].to_numpy())
        shapes += [_phase_band(a, b, str(p)) for a, b, p in zip(x0, x1, phases["phase"])]
    if marker is not None:
        shapes.append(_vline(float(x_of([marker])[0]), color="black"))
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


def breakdown_bar(
    df: pd.DataFrame, by: str, title: str | None = None, top: int = 20, axis: str | None = None
) -> go.Figure:
    """Horizontal bars of analysis.breakdown(...) or stacks.site_breakdown: bytes per `by` value,
    largest on top; `axis` titles the bars' axis (default: `by`)."""
    title = title or f"Alive by {by}"
    if df.empty:
        return empty_figure(title)
    d = df.head(top).iloc[::-1]
    unit = byte_unit(d["total_bytes"])
    labels = [str(v) if v is not None else NOTHING.get(by, "(none)") for v in d[by]]
    fig = go.Figure(
        go.Bar(
            x=in_unit(d["total_bytes"], unit[1]),
            y=labels,
            orientation="h",
            name=by,
            customdata=np.stack([d["total_bytes"].to_numpy(), d["count"].to_numpy()], axis=1),
            hovertemplate="%{y}: %{customdata[0]:,} B in %{customdata[1]} blocks<extra></extra>",
        )
    )
    fig.update_yaxes(automargin=True)
    fig = with_layout(fig, title, unit[0], axis or by).update_layout(hovermode="closest", height=max(350, 24 * len(d)))
    return mark_unit(fig, unit)


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
    unit = byte_unit(*(steps[c] for c in cols))
    fig = go.Figure(
        [
            go.Scatter(
                x=steps["step"],
                y=in_unit(steps[c], unit[1]),
                mode="lines+markers",
                name=c.removesuffix("_bytes").replace("_", " "),
                customdata=steps[c].astype("float").to_numpy(),
                hovertemplate=f"%{{y:.3f}} {unit[0]} (%{{customdata:,.0f}} B)",
            )
            for c in cols
        ]
    )
    integer_ticks(fig, float(steps["step"].max()))
    return mark_unit(with_layout(fig, "Allocator counters per step", "step", unit[0]), unit)
