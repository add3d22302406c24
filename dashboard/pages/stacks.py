"""Stacks: the allocation sites holding the most bytes at the peak, as an icicle of frames."""

import sys; from pathlib import Path  # noqa: E401
if str(Path(__file__).resolve().parents[2]) not in sys.path:  # the repo, for a page run on its own
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import streamlit as st  # noqa: E402

from dashboard import figures  # noqa: E402
from dashboard.pages import _shared as ui  # noqa: E402
from profiler import analysis  # noqa: E402

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
tree = ui.data.stack_tree(live, trace.stacks, trace.frames, top=top, depth=depth)
st.plotly_chart(figures.stack_icicle(tree))
st.dataframe(analysis.breakdown(live, "stack_id").head(top), hide_index=True)
