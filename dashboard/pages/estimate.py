"""Estimate: the analytic model (profiler/estimate.py) against the measured run."""

import streamlit as st

from dashboard import figures
from dashboard.pages import _shared as ui
from profiler import estimate as est
from profiler import headlines

st.title("Measured vs predicted")
run = ui.pick_run(ui.runs())
loaded = ui.load(run) if run else None
if loaded is None:
    st.stop()
trace, _ = loaded
try:
    table = est.measured_vs_predicted(trace)
except ValueError as e:  # a config the analytic model does not understand
    ui.headline(f"No prediction for this run: {e}")
    st.info("The analytic model covers the presets' training runs (profiler/estimate.py).")
    st.stop()
cats = table[table["level"] == "category"]
peak = cats[cats["name"] == "peak"]
ui.headline(
    headlines.estimate(
        int(peak["measured_bytes"].iloc[0]) if len(peak) else None,
        int(peak["predicted_bytes"].iloc[0]) if len(peak) else None,
    )
)
st.plotly_chart(figures.measured_vs_predicted(cats))
ui.show_table(cats.drop(columns=["level"]))
layers = table[table["level"] == "layer"]
if not layers.empty:
    st.subheader("Activations per block at the peak")
    ui.show_table(layers.drop(columns=["level"]))
