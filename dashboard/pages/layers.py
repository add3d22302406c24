"""Layers: which module holds the peak (a module's own bytes and the bytes in no module included,
so that the parts add up), and per-module forward/backward/retained bytes."""

import streamlit as st

from dashboard import figures
from dashboard.figures.layers import COLUMN_NAMES
from dashboard.pages import _shared as ui
from profiler import headlines

st.title("Layers")
run = ui.pick_run(ui.runs())
loaded = ui.load(run) if run else None
if loaded is None:
    st.stop()
story = ui.data.peak_story_of(run)
table = ui.data.module_table_of(run)
if table.empty:
    st.info("This run recorded no modules.")
    st.stop()
ui.headline(headlines.layers(story["parts"], story["peak"].allocated_bytes))
column = st.selectbox("Size by", list(COLUMN_NAMES), format_func=COLUMN_NAMES.__getitem__)
kind = st.radio("Hierarchy as", ["treemap", "icicle"], horizontal=True)
# Only the bytes at the peak have a whole to add up to: the other columns sum over the run.
parts = story["parts"] if column == "peak_contribution_bytes" else ui.data.parts_of(table, column)
st.plotly_chart(figures.module_bar(parts, column))
st.plotly_chart(figures.module_tree(parts, column, kind))
ui.show_table(table)
