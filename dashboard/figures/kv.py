"""The KV cache page: cache bytes against tokens, and what the bytes are used for."""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go

from dashboard.figures.base import GIB, empty_figure, gib, with_layout


def kv_growth(kvs: dict[str, pd.DataFrame], token_bytes: float | None = None) -> go.Figure:
    """Token-state and reserved bytes against batch x tokens per run, and the formula's line
    (token_bytes per token position)."""
    kvs = {k: v for k, v in kvs.items() if len(v)}
    if not kvs:
        return empty_figure("KV cache growth", "no kv rows")
    fig = go.Figure()
    for name, kv in kvs.items():
        fig.add_trace(
            go.Scatter(x=kv["tokens_total"], y=gib(kv["token_state_bytes"]), mode="markers", name=f"{name} token-state")
        )
        fig.add_trace(
            go.Scatter(x=kv["tokens_total"], y=gib(kv["reserved_bytes"]), mode="lines", name=f"{name} reserved")
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
    return with_layout(fig, "KV cache bytes against tokens", "token positions (batch x tokens)")


def kv_waste(waste: pd.DataFrame) -> go.Figure:
    """analysis.kv.kv_waste: stacked mean bytes per run and cache: token-state, unused, extra."""
    if waste.empty:
        return empty_figure("KV waste by cache variant")
    labels = [f"{r} / {c}" for r, c in zip(waste["run"], waste["cache"])]
    fig = go.Figure(
        [go.Bar(x=labels, y=gib(waste[c]), name=c) for c in ("token_state_bytes", "unused_bytes", "extra_bytes")]
    )
    return with_layout(fig.update_layout(barmode="stack"), "KV bytes by use (mean over steps)", "run / cache")
