"""KV cache: token-state and reserved bytes against tokens, the formula's line, and waste per variant."""

import streamlit as st

from dashboard import figures
from dashboard.pages import _shared as ui
from profiler.analysis.kv import kv_token_bytes, kv_waste

st.title("KV cache")
table = ui.readable(ui.runs())
with_kv = [r for r in table["run"] if len(ui.data.kv_of(r))]
if not with_kv:
    st.info("No run here recorded a KV cache (kv.parquet).")
    st.stop()
names = dict(zip(table["run"], table["name"]))
chosen = st.multiselect("Runs", with_kv, default=with_kv, format_func=lambda p: names[p])
if not chosen:
    st.info("Pick at least one run.")
    st.stop()
kvs = {names[r]: ui.data.kv_of(r) for r in chosen}
# Quantised and windowed caches hold fewer bytes per token: the full-width one meets the formula.
guess = max((kv_token_bytes(kv) or 0.0) for kv in kvs.values())
token_bytes = st.number_input(
    "Formula: bytes per token position (2 x layers x heads x head_dim x dtype bytes)",
    min_value=0.0,
    value=float(guess or 0.0),
    step=1024.0,
)
st.plotly_chart(figures.kv_growth(kvs, token_bytes))
waste = kv_waste(kvs)
st.plotly_chart(figures.kv_waste(waste))
st.dataframe(waste, hide_index=True)
