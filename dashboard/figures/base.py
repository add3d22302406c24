"""What every figure shares: bytes in a unit that suits them, time axes, an empty figure that
says why, and one layout.

Bytes stay bytes in the data. An axis shows them in the binary unit that suits the largest
value drawn (a 23 MiB run in MiB, a 10 GiB one in GiB), with the exact bytes on hover; the
unit chosen is kept in the figure's layout.meta["bytes_per_unit"], so that a test can read a
drawn value back as bytes.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

GIB = float(1 << 30)
UNITS = (("B", 1.0), ("KiB", 1024.0), ("MiB", float(1 << 20)), ("GiB", GIB), ("TiB", float(1 << 40)))
# What an event-indexed x axis can be shown against, and the axis title of each.
TIME_AXES = {"seconds": "seconds since capture began", "steps": "step", "events": "event number"}


def as_float(values) -> np.ndarray:
    """Numbers as floats; anything that is not a number becomes NaN."""
    return pd.to_numeric(pd.Series(values), errors="coerce").to_numpy(dtype=float)


def byte_unit(*values) -> tuple[str, float]:
    """(name, bytes per unit) of the largest binary unit in which the largest |value| is at least 1."""
    top = 0.0
    for v in values:
        a = np.abs(as_float(v))
        if a.size and np.isfinite(a).any():
            top = max(top, float(np.nanmax(a)))
    name, size = UNITS[0]
    for n, s in UNITS:
        if top >= s:
            name, size = n, s
    return name, size


def in_unit(values, size: float) -> np.ndarray:
    return as_float(values) / size


def mark_unit(fig: go.Figure, unit: tuple[str, float]) -> go.Figure:
    fig.update_layout(meta={"bytes_per_unit": unit[1], "byte_unit": unit[0]})
    return fig


def integer_ticks(fig: go.Figure, top, axis: str = "x") -> go.Figure:
    """Whole-number ticks (steps, ranks), never one at step 0.5: every number up to 30, beyond that
    plotly's own spacing, which is whole there."""
    update = fig.update_xaxes if axis == "x" else fig.update_yaxes
    if top is not None and np.isfinite(top) and top <= 30:
        return update(tickmode="linear", tick0=0, dtick=1)
    return update(tickformat="d")


def empty_figure(title: str, note: str = "nothing to show") -> go.Figure:
    """A titled figure that says, in its middle, why there is nothing to draw."""
    fig = go.Figure()
    fig.update_layout(
        title=title, annotations=[dict(text=note, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper")]
    )
    return fig


def with_layout(fig: go.Figure, title: str, x: str, y: str = "GiB") -> go.Figure:
    """`fig` with the layout every chart shares: titles, one hover label per x, the legend below."""
    fig.update_layout(
        title=title,
        xaxis_title=x,
        yaxis_title=y,
        hovermode="x unified",
        legend=dict(orientation="h", y=-0.2),
        margin=dict(t=50, l=10, r=10),
    )
    return fig
