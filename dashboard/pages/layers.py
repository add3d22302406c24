"""Layers: per-module forward/backward/retained bytes and contribution to the peak."""

import streamlit as st

from dashboard import figures
from dashboard.pages import _shared as ui
from profiler import analysis

COLUMNS = [
    "peak_contribution_bytes",
    "retained_bytes",
    "forward_alloc_bytes",
    "backward_alloc_bytes",
    "recompute_alloc_bytes",
    "param_bytes",
]

st.title("Layers")
run = ui.pick_run(ui.runs())
loaded = ui.load(run) if run else None
if loaded is None:
    st.stop()
trace, lt = loaded
table = analysis.module_table(trace, lt=lt)
if table.empty:
    st.info("This run recorded no modules.")
    st.stop()
column = st.selectbox("Size by", COLUMNS)
kind = st.radio("Hierarchy as", ["treemap", "icicle"], horizontal=True)
st.plotly_chart(figures.module_bar(table, column))
st.plotly_chart(figures.module_tree(analysis.rollup(table), column, kind))
st.dataframe(table, hide_index=True)
