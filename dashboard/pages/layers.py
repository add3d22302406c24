"""Layers: per-module forward/backward/retained bytes and contribution to the peak."""

import sys; from pathlib import Path  # noqa: E401
if str(Path(__file__).resolve().parents[2]) not in sys.path:  # the repo, for a page run on its own
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import streamlit as st  # noqa: E402

from dashboard import figures  # noqa: E402
from dashboard.pages import _shared as ui  # noqa: E402
from profiler import analysis  # noqa: E402

COLUMNS = ["peak_contribution_bytes", "retained_bytes", "forward_alloc_bytes", "backward_alloc_bytes",
           "recompute_alloc_bytes", "param_bytes"]

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
