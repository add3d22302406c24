"""Estimate: the analytic model (profiler/estimate.py) against the measured run."""

import sys; from pathlib import Path  # noqa: E401
if str(Path(__file__).resolve().parents[2]) not in sys.path:  # the repo, for a page run on its own
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import streamlit as st  # noqa: E402

from dashboard import figures  # noqa: E402
from dashboard.pages import _shared as ui  # noqa: E402
from profiler import estimate as est  # noqa: E402

st.title("Measured vs predicted")
run = ui.pick_run(ui.runs())
loaded = ui.load(run) if run else None
if loaded is None:
    st.stop()
trace, _ = loaded
try:
    table = est.measured_vs_predicted(trace)
except ValueError as e:  # a config the analytic model does not understand
    st.info(f"No prediction for this run: {e}")
    st.stop()
cats = table[table["level"] == "category"]
st.plotly_chart(figures.measured_vs_predicted(cats))
st.dataframe(cats.drop(columns=["level"]), hide_index=True)
layers = table[table["level"] == "layer"]
if not layers.empty:
    st.subheader("Activations per block at the peak")
    st.dataframe(layers.drop(columns=["level"]), hide_index=True)
