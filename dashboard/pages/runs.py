"""Runs: every run under VRAMSCOPE_TRACES, unreadable ones with their error; pick runs to compare."""

import streamlit as st

from dashboard.pages import _shared as ui
from dashboard.text import literal

st.title("Runs")
st.caption(f"Folder: {literal(ui.data.traces_dir())}")
table = ui.runs()
if table.empty:
    st.info("No runs found. Set VRAMSCOPE_TRACES to a folder of vramscope traces.")
    st.stop()

if table["world_size"].notna().any():
    st.caption(
        "A multi-rank run is one row: its peaks are per GPU (the largest rank's), skew is that peak "
        "against the median rank's; the Ranks page shows every rank."
    )
st.dataframe(table, hide_index=True, column_config=ui.number_columns(table))
bad = table[table["error"].notna()]
for message in bad["error"]:
    st.warning(literal(message))
for name, failed in zip(table["name"], table["failed_ranks"]):
    if isinstance(failed, str):
        ranks = f"{literal(name)}: rank(s) {literal(failed)}"
        st.warning(f"{ranks} missing, failed or unfinished; the Ranks page says why.")

ok = ui.readable(table)
names = dict(zip(ok["run"], ok["name"]))
kept = [r for r in st.session_state.get(ui.SELECTED, []) if r in names]
chosen = st.multiselect(
    "Runs to compare (first is the baseline)", list(names), default=kept, format_func=lambda p: names[p]
)
st.session_state[ui.SELECTED] = chosen
if chosen:
    st.page_link("pages/compare.py", label=f"Compare {len(chosen)} runs", icon=":material/compare_arrows:")
