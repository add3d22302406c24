"""Runs: every run under VRAMSCOPE_TRACES, unreadable ones with their error; pick runs to compare."""

import streamlit as st

from dashboard.pages import _shared as ui
from dashboard.text import literal
from profiler import headlines

st.title("Runs")
table = ui.runs()
if table.empty:
    st.info("No runs found. Set VRAMSCOPE_TRACES to a folder of vramscope traces.")
    st.stop()
bad = table[table["error"].notna()]
ui.headline(headlines.runs(table["name"].tolist(), table["peak_allocated_bytes"].tolist(), len(bad)))
st.caption(f"Folder: {literal(ui.data.traces_dir())}")

if table["world_size"].notna().any():
    st.caption(
        "A multi-rank run is one row: its peaks are per GPU (the largest rank's), skew is that peak "
        "against the median rank's; the Ranks page shows every rank."
    )
ui.show_table(table)
ui.unreadable_note(table)
for name, failed in zip(table["name"], table["failed_ranks"]):
    if isinstance(failed, str):
        ranks = f"{literal(name)}: rank(s) {literal(failed)}"
        st.warning(f"{ranks} missing, failed or unfinished; the Ranks page says why.")

ok = ui.readable(table)
names = ui.labels(ok)
chosen = ui.keyed_multiselect(
    "Runs to compare (first is the baseline)", list(names), ui.SELECTED, [], names.__getitem__
)
if chosen:
    st.page_link("pages/compare.py", label=f"Compare {len(chosen)} runs", icon=":material/compare_arrows:")
