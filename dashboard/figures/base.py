"""What every figure shares: bytes in GiB, an empty figure that says why, and one layout."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

GIB = float(1 << 30)


def gib(values) -> np.ndarray:
    """Bytes as GiB floats for an axis; anything that is not a number becomes NaN."""
    return pd.to_numeric(pd.Series(values), errors="coerce").to_numpy(dtype=float) / GIB


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
