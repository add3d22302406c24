"""The KV cache page: cache bytes against tokens, and what the bytes are used for."""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go

from dashboard.figures.base import byte_unit, empty_figure, in_unit, mark_unit, with_layout

WASTE_NAMES = {"token_state_bytes": "token states", "unused_bytes": "unused", "extra_bytes": "extra"}


def kv_growth(kvs: dict[str, pd.DataFrame], token_bytes: float | None = None) -> go.Figure:
    """Token-state and reserved bytes against batch x tokens per run, and the formula's line
    (token_bytes per token position)."""
    kvs = {k: v for k, v in kvs.items() if len(v)}
    if not kvs:
        return empty_figure("KV cache growth", "no kv rows")
    unit = byte_unit(*(v["reserved_bytes"] for v in kvs.values()), *(v["token_state_bytes"] for v in kvs.values()))
    fig = go.Figure()
    for name, kv in kvs.items():
        for col, mode, what in (
            ("token_state_bytes", "markers", "token states"),
            ("reserved_bytes", "lines", "reserved"),
        ):
            fig.add_trace(
                go.Scatter(
                    x=kv["tokens_total"],
                    y=in_unit(kv[col], unit[1]),
                    mode=mode,
                    name=f"{name} {what}",
                    customdata=kv[col].astype("float").to_numpy(),
                    hovertemplate=f"{name} {what}: %{{y:.3f}} {unit[0]} (%{{customdata:,.0f}} B)"
                    " at %{x:,} positions<extra></extra>",
                )
            )
    if token_bytes:
        top = max(int(v["tokens_total"].max()) for v in kvs.values())
        fig.add_trace(
            go.Scatter(
                x=[0, top],
                y=[0, top * token_bytes / unit[1]],
                mode="lines",
                name="formula",
                line=dict(color="black", dash="dash"),
            )
        )
    fig = with_layout(fig, "KV cache bytes against tokens", "token positions (batch x tokens)", unit[0])
    return mark_unit(fig.update_layout(hovermode="closest"), unit)


def kv_waste(waste: pd.DataFrame) -> go.Figure:
    """analysis.kv.kv_waste: stacked mean bytes per run and cache: token-state, unused, extra."""
    if waste.empty:
        return empty_figure("KV waste by cache variant")
    labels = [f"{r} / {c}" for r, c in zip(waste["run"], waste["cache"])]
    cols = list(WASTE_NAMES)
    unit = byte_unit(waste[cols].sum(axis=1))
    fig = go.Figure(
        [
            go.Bar(
                x=labels,
                y=in_unit(waste[c], unit[1]),
                name=WASTE_NAMES[c],
                customdata=waste[c].round().to_numpy(),
                hovertemplate=f"{WASTE_NAMES[c]}: %{{customdata:,.0f}} B<extra></extra>",
            )
            for c in cols
        ]
    )
    fig = with_layout(fig.update_layout(barmode="stack"), "KV bytes by use (mean over steps)", "run / cache", unit[0])
    return mark_unit(fig, unit)
