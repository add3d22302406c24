"""Fragmentation: free space inside reserved memory over time, and the segment map at a moment."""

import streamlit as st

from dashboard import figures
from dashboard.pages import _shared as ui
from dashboard.pages._verdicts import fragmentation_verdict
from profiler import analysis

st.title("Fragmentation")
run = ui.pick_run(ui.runs())
loaded = ui.load(run) if run else None
if loaded is None:
    st.stop()
trace, lt = loaded
if trace.backend == "cpu" or trace.events.empty:
    ui.headline("No allocator segments in this run (CPU backend or no events): nothing fragments.")
    st.stop()
fragmentation_verdict(trace, lt)
st.subheader("Over the run")
story = ui.data.peak_story_of(run)
axis = ui.time_axis("fragmentation_axis", has_steps=len(story["spans"]) > 0)
every = st.number_input("Also sample every N events (0: step ends and the peak only)", 0, value=0, step=1000)
frag = analysis.fragmentation(trace, every_n_events=int(every) or None, lt=lt)
st.plotly_chart(figures.fragmentation_lines(frag, ui.data.event_axis(trace, story["spans"], axis), axis))
ui.show_table(frag)

p = analysis.peak(trace, lt)
moment = st.slider("Segment map after event", 0, len(trace.events) - 1, max(p.event_index, 0), key="frag_moment")
color_by = st.radio("Colour blocks by", ["state", "category"], horizontal=True)
blocks = ui.data.blocks_with_owners(
    analysis.segment_map_at(trace, moment, lt), analysis.live_at(trace, moment, lt), trace.stacks, trace.frames
)
st.plotly_chart(figures.segment_map(blocks, color_by))

st.subheader("Allocator settings")
st.json(
    {
        "allocator_settings": trace.meta.get("allocator_settings"),
        "PYTORCH_CUDA_ALLOC_CONF": trace.meta.get("alloc_conf_env"),
    },
    expanded=False,
)
