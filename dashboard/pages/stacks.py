"""Stacks: the lines of code holding the most bytes at the peak, the user's own frames first, and
their call paths as an icicle (library, torch and vramscope frames folded away unless asked for)."""

import streamlit as st

from dashboard import figures
from dashboard.pages import _shared as ui
from profiler import analysis, headlines
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
story = ui.data.peak_story_of(run)
sites = story["sites"]
ui.headline(headlines.stacks(sites, story["peak"].allocated_bytes))
top = st.slider("Allocation sites", 5, 200, 40)
st.plotly_chart(
    figures.breakdown_bar(
        sites, "site", "Lines of code holding bytes at the peak", top=min(top, 25), axis="file:line function"
    )
)
fold = not st.toggle("Show library, torch and vramscope frames", value=False)
depth = st.slider("Frames per site", 2, 40, 12)
live = analysis.alive_at_peak(trace, lt)
st.plotly_chart(figures.stack_icicle(stack_tree(live, trace.stacks, trace.frames, top=top, depth=depth, fold=fold)))
ui.show_table(sites.head(top))
