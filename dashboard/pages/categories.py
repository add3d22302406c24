"""Categories: allocated bytes by category over time, and the breakdown at the peak."""

import sys; from pathlib import Path  # noqa: E401
if str(Path(__file__).resolve().parents[2]) not in sys.path:  # the repo, for a page run on its own
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import streamlit as st  # noqa: E402

from dashboard import figures  # noqa: E402
from dashboard.pages import _shared as ui  # noqa: E402
from profiler import analysis  # noqa: E402
from profiler.analysis.categories import category_names  # noqa: E402

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
st.plotly_chart(figures.category_area(ct, category_names(c for c in ct.columns if c not in
                                                         ("ts_us", "event_index", "step", "allocated_bytes"))))
at_peak = analysis.category_at_peak(trace, lt)
st.plotly_chart(figures.category_peak_bar(at_peak))
st.dataframe(at_peak, hide_index=True)
st.subheader("Each category's own peak")
st.dataframe(analysis.category_peaks(trace, lt), hide_index=True)
