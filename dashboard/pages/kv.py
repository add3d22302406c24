"""KV cache: bytes per token and waste first, then token-state and reserved bytes against tokens,
the formula's line, and waste per variant."""

import streamlit as st

from dashboard import figures
from dashboard.pages import _shared as ui
from dashboard.text import literal
from profiler import headlines
from profiler.analysis.kv import kv_summary, kv_token_bytes, kv_waste
from profiler.errors import TraceError

st.title("KV cache")
runs = ui.runs()
ui.unreadable_note(runs)
table = ui.readable(runs)
names = ui.labels(table)
kv_runs = {}
for r in table["run"]:
    try:
        kv = ui.data.kv_of(r)
    except TraceError as exc:  # a run whose kv table cannot be read: one line, the others still load
        st.warning(f"Left out {literal(names[r])}: {literal(exc)}", icon=":material/error:")
        continue
    if len(kv):
        kv_runs[r] = kv
if not kv_runs:
    st.info("No run here recorded a KV cache (kv.parquet).")
    st.stop()
chosen = ui.keyed_multiselect("Runs", list(kv_runs), "kv_runs", list(kv_runs), names.__getitem__)
if not chosen:
    st.info("Pick at least one run.")
    st.stop()
short = dict(zip(table["run"], table["name"]))
kvs = {short[r]: kv_runs[r] for r in chosen}
waste = kv_waste(kvs)
ui.headline(headlines.kv({n: kv_summary(kv) for n, kv in kvs.items()}, waste))
# Quantised and windowed caches hold fewer bytes per token: the full-width one meets the formula.
guess = max((kv_token_bytes(kv) or 0.0) for kv in kvs.values())
token_bytes = st.number_input(
    "Formula: bytes per token position (2 x layers x heads x head_dim x dtype bytes)",
    min_value=0.0,
    value=float(guess or 0.0),
    step=1024.0,
)
st.plotly_chart(figures.kv_growth(kvs, token_bytes))
st.plotly_chart(figures.kv_waste(waste))
ui.show_table(waste, hide=())  # its run column is the run's name
