"""Stacks: the allocation sites holding the most bytes at the peak, as an icicle of frames."""

import streamlit as st

from dashboard import figures
from dashboard.pages import _shared as ui
from profiler import analysis
from profiler.analysis.stacks import stack_tree

st.title("Stacks")
run = ui.pick_run(ui.runs())
loaded = ui.load(run) if run else None
if loaded is None:
    st.stop()
trace, lt = loaded
if trace.stacks.empty:
    st.info("This run recorded no stacks (capture without stacks).")
    st.stop()
top = st.slider("Allocation sites", 5, 200, 40)
depth = st.slider("Frames per site", 2, 40, 12)
live = analysis.alive_at_peak(trace, lt)
tree = stack_tree(live, trace.stacks, trace.frames, top=top, depth=depth)
st.plotly_chart(figures.stack_icicle(tree))
st.dataframe(analysis.breakdown(live, "stack_id").head(top), hide_index=True)
