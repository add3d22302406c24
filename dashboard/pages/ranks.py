"""Ranks: one multi-rank (torchrun) run rank by rank: peaks and their skew, timelines, categories, failed ranks."""

import streamlit as st

from dashboard import figures
from dashboard.pages import _shared as ui
from dashboard.text import literal
from profiler import headlines
from profiler.analysis import ranks
from profiler.analysis.categories import category_names
from profiler.trace import layout
from profiler.units import exact_bytes, human_bytes

MAX_WARNINGS = 20  # failed ranks listed one by one; the table holds them all

st.title("Ranks")
runs = ui.runs()
jobs = ui.multi_rank_runs(runs)
if jobs.empty:
    ui.headline(f"None of the {len(runs)} runs here is a multi-rank run: there is no skew to show.")
    st.info(
        f"No multi-rank run under {ui.data.traces_dir()}. A distributed (torchrun) capture writes one "
        "folder per job with a rank=N partition per rank; such a job shows here."
    )
    cols = st.columns(2)  # what was searched, so that an empty answer is not mistaken for an empty folder
    cols[0].metric("Multi-rank runs", 0)
    cols[1].metric("Single-process runs", len(runs))
    st.stop()

names = ui.labels(jobs)
paths = jobs["run"].tolist()
current = st.session_state.get(ui.CURRENT_JOB) or str(layout.run_root_of(st.session_state.get(ui.CURRENT) or ""))
job = st.selectbox(
    "Multi-rank run",
    paths,
    index=paths.index(current) if current in paths else 0,
    format_func=names.__getitem__,
)
st.session_state[ui.CURRENT_JOB] = job

records = ui.data.rank_records_of(job)
table = ranks.rank_table_of(records)
skew = ranks.rank_skew(table)
ui.headline(headlines.ranks(skew, len(table)))
top, bottom = st.columns(3), st.columns(3)
top[0].metric("World size", f"{len(table)}", help=f"{skew['ranks']} with a readable peak")
if skew["max_rank"] is not None:
    top[1].metric(
        f"Per-GPU peak (rank {skew['max_rank']})", human_bytes(skew["max_bytes"]), help=exact_bytes(skew["max_bytes"])
    )
    top[2].metric(
        f"Smallest peak (rank {skew['min_rank']})", human_bytes(skew["min_bytes"]), help=exact_bytes(skew["min_bytes"])
    )
    median = round(skew["median_bytes"])
    bottom[0].metric("Median peak", human_bytes(median), help=exact_bytes(median))
    bottom[1].metric(
        "Max / min",
        "-" if skew["max_min_ratio"] is None else f"{skew['max_min_ratio']:.4f}",
        help=f"spread {exact_bytes(skew['spread_bytes'])}",
    )
    bottom[2].metric("Max against median", "-" if skew["skew_pct"] is None else f"{skew['skew_pct']:+.2f}%")
st.plotly_chart(figures.rank_peaks(table, skew))

failed = table[table["error"].notna()]
for message in failed["error"].head(MAX_WARNINGS):
    st.warning(literal(message))
if len(failed) > MAX_WARNINGS:
    st.warning(f"... and {len(failed) - MAX_WARNINGS} more failed ranks (see the table below).")

readable = table.loc[table["replayed_peak_bytes"].notna(), "rank"].tolist()
if not readable:
    st.info("No rank of this run could be read.")
    ui.show_table(table, hide=("path",))
    st.stop()
chosen = ui.keyed_multiselect(
    f"Ranks to overlay (up to {ui.data.MAX_RANK_LINES})",
    readable,
    f"ranks_of_{job}",
    ranks.ranks_to_overlay(table, skew),
    str,
    max_selections=ui.data.MAX_RANK_LINES,
)
st.plotly_chart(figures.rank_timelines(ui.data.rank_timelines_of(job, chosen)))

at_peak = ranks.rank_categories_of(records)
st.plotly_chart(
    figures.rank_categories(
        at_peak, category_names(c for c in at_peak.columns if c not in ("rank", "peak_allocated_bytes"))
    )
)
ui.show_table(table, hide=("path",))
