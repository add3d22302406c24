"""Overview: memory over time with steps, phases and the peak; what is alive at a chosen moment."""

import streamlit as st

from dashboard import figures
from dashboard.pages import _shared as ui
from profiler import analysis
from profiler.units import exact_bytes

st.title("Overview")
run = ui.pick_run(ui.runs())
loaded = ui.load(run) if run else None
if loaded is None:
    st.stop()
trace, lt = loaded
s = ui.data.summary_of(run)
p = analysis.peak(trace, lt)

where = (
    "at the start of capture"
    if p.event_index < 0
    else f"step {p.step}, phase {p.phase or '(none)'}, event {p.event_index:,}"
)
cols = st.columns(4)
cols[0].metric("Peak allocated", exact_bytes(p.allocated_bytes), help=where)
cols[1].metric("Active then", exact_bytes(s["active_at_peak_bytes"]))
cols[2].metric("Peak reserved", exact_bytes(s["peak_reserved_bytes"]))
cols[3].metric("Allocator max", exact_bytes(s["allocator_max_allocated_bytes"]))

if trace.events.empty:
    st.info("This run has no allocator events.")
    st.stop()
n = len(trace.events)
moment = st.slider("Moment (event index)", 0, n - 1, max(p.event_index, 0), key="overview_moment")
tl = analysis.memory_timeline(trace, lt, max_points=ui.data.MAX_POINTS)
st.plotly_chart(figures.memory_timeline(tl, p, analysis.step_spans(trace, lt), analysis.phase_spans(trace), moment))

by = st.radio("Alive at this moment, by", ["module", "category", "stack_id"], horizontal=True)
live = analysis.live_at(trace, moment, lt)
st.plotly_chart(figures.breakdown_bar(analysis.breakdown(live, by), by, f"Alive after event {moment:,} by {by}"))

st.subheader("Allocator counters per step")
counters = analysis.allocator_counters(trace)
if counters.empty:
    st.info("No per-step allocator counters in this run.")
else:
    st.plotly_chart(figures.allocator_counters(counters))
    st.dataframe(counters, hide_index=True)
