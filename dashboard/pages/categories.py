"""Categories: allocated bytes by category over time, and the breakdown at the peak."""

import streamlit as st

from dashboard import figures
from dashboard.pages import _shared as ui
from profiler import analysis, headlines
from profiler.analysis.categories import category_names

st.title("Categories")
run = ui.pick_run(ui.runs())
loaded = ui.load(run) if run else None
if loaded is None:
    st.stop()
trace, lt = loaded
story = ui.data.peak_story_of(run)
at_peak = story["categories"]
ui.headline(headlines.categories(at_peak, story["peak"].allocated_bytes))
ct = analysis.category_timeline(trace, max_points=ui.data.MAX_POINTS, lt=lt)
if ct.empty:
    st.info("This run has no allocator events.")
    st.stop()
axis = ui.time_axis("categories_axis", has_steps=len(story["spans"]) > 0)
st.plotly_chart(
    figures.category_area(
        ct,
        category_names(c for c in ct.columns if c not in ("ts_us", "event_index", "step", "allocated_bytes")),
        ui.data.event_axis(trace, story["spans"], axis),
        axis,
    )
)
st.plotly_chart(figures.category_peak_bar(at_peak))
ui.show_table(at_peak)
st.subheader("Each category's own peak")
ui.show_table(analysis.category_peaks(trace, lt))
