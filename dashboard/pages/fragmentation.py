"""Fragmentation: why reserved exceeds allocated, the allocator's slack at every step end, and the
segments that hold the free bytes at a chosen moment."""

import streamlit as st

from dashboard import figures
from dashboard.pages import _shared as ui
from dashboard.pages._verdicts import fragmentation_verdict, slack_view
from profiler import analysis
from profiler.analysis.slack import ranking_for
from profiler.units import human_bytes

TOP_SEGMENTS = 10  # segments drawn until "show all" is on: the ones holding the most free bytes
ANOTHER = "another event..."

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
st.subheader("Over the run, at every step end")
verdict, by_step = slack_view(trace, lt)

st.subheader("The segments that hold the free bytes")
# The moment the verdict judged comes first, so that the map shows the bytes the sentence names.
p = analysis.peak(trace, lt)
moments = {f"end of step {s} (event {k})": int(k) for s, k in zip(by_step["step"], by_step["event_index"])}
moments[f"the allocated peak (event {p.event_index})"] = p.event_index
judged = next((label for label, k in moments.items() if k == verdict.at_step.get("event_index")), None)
options = list(moments) + [ANOTHER]
chosen = st.selectbox("Segment map at", options, index=options.index(judged) if judged else 0, key="frag_at")
if chosen == ANOTHER:
    moment = st.slider("After event", 0, len(trace.events) - 1, max(p.event_index, 0), key="frag_moment")
else:
    moment = moments[chosen]
layout = analysis.segment_map_at(trace, moment, lt)
by = ranking_for(verdict)
ranked = analysis.segment_slack(layout, by)
show_all = st.toggle(f"Show all {len(ranked)} segments", key="frag_all_segments")
kept = ranked if show_all else ranked.head(TOP_SEGMENTS)
first = "free bytes between live blocks" if by == "inactive_split_bytes" else "free bytes"
st.caption(
    f"{len(kept)} of {len(ranked)} segments, those with the most {first} first (what the verdict names):"
    f" they hold {human_bytes(int(kept['inactive_split_bytes'].sum()))} of the"
    f" {human_bytes(int(ranked['inactive_split_bytes'].sum()))} inactive split and"
    f" {human_bytes(int(kept['free_bytes'].sum()))} of the {human_bytes(int(ranked['free_bytes'].sum()))}"
    " free bytes at this moment."
)
color_by = st.radio("Colour blocks by", ["state", "category"], horizontal=True)
shown = analysis.collapse_segments(layout, None if show_all else TOP_SEGMENTS, by)
blocks = ui.data.blocks_with_owners(shown, analysis.live_at(trace, moment, lt), trace.stacks, trace.frames)
st.plotly_chart(figures.segment_map(blocks, color_by), key="segment_map")

st.subheader("Allocator settings")
st.json(
    {
        "allocator_settings": trace.meta.get("allocator_settings"),
        "PYTORCH_CUDA_ALLOC_CONF": trace.meta.get("alloc_conf_env"),
    },
    expanded=False,
)
