"""Live: a run without a final status, redrawn every few seconds while its process writes."""

import streamlit as st

from dashboard import figures
from dashboard.pages import _shared as ui
from dashboard.text import literal
from profiler import analysis
from profiler.headlines import where_peak
from profiler.trace.meta import RUNNING, RUNNING_ELSEWHERE
from profiler.units import exact_bytes, human_bytes

st.title("Live")
table = ui.runs()
running = table[table["status"].isin([RUNNING, RUNNING_ELSEWHERE])]  # not those that died
if running.empty:
    st.info("No run is capturing now: every run under the folder has ended (or its process died).")
    st.stop()
run = ui.pick_run(running, "Running run")
seconds = st.slider("Refresh every (s)", 1, 30, 2)


@st.fragment(run_every=seconds)
def _live(run: str) -> None:
    loaded = ui.load(run)  # keyed by the files' sizes and times: re-read only when they grew
    if loaded is None:
        return
    trace, lt = loaded
    if trace.status != "running":
        st.success(f"The run finished with status {literal(trace.status)}.")
    p = analysis.peak(trace, lt)
    ui.headline(
        f"{'Capturing' if trace.status == 'running' else 'Finished'}: {len(trace.events):,} events in "
        f"{len(trace.steps):,} steps so far; the peak so far is {human_bytes(p.allocated_bytes)} {where_peak(p)}."
    )
    cols = st.columns(3)
    cols[0].metric("Events so far", f"{len(trace.events):,}")
    cols[1].metric("Steps so far", f"{len(trace.steps):,}")
    cols[2].metric("Peak allocated so far", exact_bytes(p.allocated_bytes))
    tl = analysis.memory_timeline(trace, lt, max_points=ui.data.MAX_POINTS)
    st.plotly_chart(figures.memory_timeline(tl, p, analysis.step_spans(trace, lt)))


if run:
    _live(run)
