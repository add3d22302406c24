"""Overview: the peak in one sentence, memory over time with steps, phases and the peak, and what
is alive at a chosen moment (click the timeline, or move the slider)."""

import streamlit as st

from dashboard import figures
from dashboard.pages import _shared as ui
from profiler import analysis, headlines
from profiler.analysis.stacks import site_breakdown
from profiler.units import exact_bytes, human_bytes

TIMELINE = "overview_timeline"
MOMENT = "overview_moment"
CLICKED = "overview_clicked"  # the click already applied: a selection stays set on later reruns

st.title("Overview")
run = ui.pick_run(ui.runs())
loaded = ui.load(run) if run else None
if loaded is None:
    st.stop()
trace, lt = loaded
s = ui.data.stored_summary(run)  # summary.json where it is fresh
story = ui.data.peak_story_of(run)
p = story["peak"]
ui.headline(headlines.overview(p, story["categories"], story["parts"], story["sites"]))

where = headlines.where_peak(p) + ("" if p.event_index < 0 else f", event {p.event_index:,}")
cols = st.columns(4)
cols[0].metric("Peak allocated", human_bytes(p.allocated_bytes), help=f"{exact_bytes(p.allocated_bytes)}, {where}")
cols[1].metric("Active then", human_bytes(s["active_at_peak_bytes"]), help=exact_bytes(s["active_at_peak_bytes"]))
cols[2].metric("Peak reserved", human_bytes(s["peak_reserved_bytes"]), help=exact_bytes(s["peak_reserved_bytes"]))
cols[3].metric(
    "Allocator max",
    human_bytes(s["allocator_max_allocated_bytes"]),
    help=f"{exact_bytes(s['allocator_max_allocated_bytes'])}: torch's own max_memory_allocated",
)

if trace.events.empty:
    st.info("This run has no allocator events.")
    st.stop()
n = len(trace.events)
clicked = st.session_state.get(TIMELINE)
points = clicked.selection.points if clicked is not None and clicked.selection else []
if points and points[0].get("customdata") is not None and points[0] != st.session_state.get(CLICKED):
    st.session_state[CLICKED] = points[0]
    st.session_state[MOMENT] = int(min(max(points[0]["customdata"][-1], 0), n - 1))
if MOMENT not in st.session_state:
    st.session_state[MOMENT] = max(p.event_index, 0)
spans = story["spans"]
axis = ui.time_axis("overview_axis", has_steps=len(spans) > 0)
moment = st.slider("Moment (event number): or click a point on the timeline", 0, n - 1, key=MOMENT)
drawn = ui.data.timeline_parts_of(run)
x_of = ui.data.event_axis(trace, spans, axis)
st.plotly_chart(
    figures.memory_timeline(drawn["timeline"], p, spans, drawn["phases"], moment, x_of=x_of, axis=axis),
    key=TIMELINE,
    on_select="rerun",
    selection_mode="points",
)

by = st.radio("Alive at this moment, by", ["module", "category", "line of code"], horizontal=True)
live = analysis.live_at(trace, moment, lt)
if by == "line of code":
    parts, key = site_breakdown(live, trace.stacks, trace.frames), "site"
else:
    parts, key = analysis.breakdown(live, by), by
st.plotly_chart(figures.breakdown_bar(parts, key, f"Alive after event {moment:,} by {by}", axis=by))

st.subheader("Allocator counters per step")
counters = drawn["counters"]
if counters.empty:
    st.info("No per-step allocator counters in this run.")
else:
    st.plotly_chart(figures.allocator_counters(counters))
    ui.show_table(counters)
