"""Categories: allocated bytes by category over time, and the breakdown at the peak."""

import streamlit as st

from dashboard import figures
from dashboard.pages import _shared as ui
from profiler import analysis
from profiler.analysis.categories import category_names

st.title("Categories")
run = ui.pick_run(ui.runs())
loaded = ui.load(run) if run else None
if loaded is None:
    st.stop()
trace, lt = loaded
ct = analysis.category_timeline(trace, max_points=ui.data.MAX_POINTS, lt=lt)
if ct.empty:
    st.info("This run has no allocator events.")
    st.stop()
st.plotly_chart(
    figures.category_area(
        ct, category_names(c for c in ct.columns if c not in ("ts_us", "event_index", "step", "allocated_bytes"))
    )
)
at_peak = analysis.category_at_peak(trace, lt)
st.plotly_chart(figures.category_peak_bar(at_peak))
st.dataframe(at_peak, hide_index=True)
st.subheader("Each category's own peak")
st.dataframe(analysis.category_peaks(trace, lt), hide_index=True)
