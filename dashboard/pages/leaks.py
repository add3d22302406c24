"""Growth: memory alive at the end of each step that keeps growing, by allocation site and module."""

import streamlit as st

from dashboard.pages import _shared as ui
from dashboard.pages._verdicts import growth_view

st.title("Growth")
run = ui.pick_run(ui.runs())
loaded = ui.load(run) if run else None
if loaded is None:
    st.stop()
trace, lt = loaded
growth_view(trace, lt)
