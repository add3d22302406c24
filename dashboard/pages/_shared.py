"""What every page shares: the runs folder, the run pickers and how tables show numbers."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import streamlit as st

from dashboard import data
from dashboard.text import literal
from profiler.errors import TraceError
from profiler.trace import layout

CURRENT = "current_run"  # session key: the run the single-run pages show (a rank's partition of a job)
SELECTED = "compare_runs"  # session key: the runs the Runs page hands to Compare
CURRENT_JOB = "current_job"  # session key: the multi-rank run the Ranks page shows
# How the tables of runs and of ranks show their numbers: column -> (label, printf format).
NUMBER_COLUMNS = {
    "world_size": ("world size", "%d"),
    "peak_allocated_bytes": ("peak allocated (B)", "%d"),
    "peak_skew_pct": ("peak skew (%)", "%+.2f"),
    "skew_pct": ("against median (%)", "%+.2f"),
    "peak_reserved_bytes": ("peak reserved (B)", "%d"),
    "replayed_peak_bytes": ("replayed peak (B)", "%d"),
    "fragmentation_ratio_at_peak": ("fragmentation at peak", "%.3f"),
    "median_step_time_us": ("step time (us)", "%.0f"),
}


def runs() -> pd.DataFrame:
    """The runs table of VRAMSCOPE_TRACES (empty, with an error shown, if the folder is missing)."""
    root = data.traces_dir()
    try:
        return data.cached_runs_table(str(root), data.root_stamp(root))
    except TraceError as exc:
        st.error(literal(exc))
        return pd.DataFrame(columns=list(data.RUN_COLUMNS))


def number_columns(table: pd.DataFrame) -> dict:
    """st.dataframe's column_config for the NUMBER_COLUMNS that `table` has."""
    return {
        c: st.column_config.NumberColumn(label, format=fmt) for c, (label, fmt) in NUMBER_COLUMNS.items() if c in table
    }


def readable(table: pd.DataFrame) -> pd.DataFrame:
    return table[table["error"].isna()]


def labels(table: pd.DataFrame) -> dict[str, str]:
    """run path -> what a picker shows (data.run_labels: name, folder, device, date)."""
    return dict(zip(table["run"], table["label"]))


def unreadable_note(table: pd.DataFrame) -> None:
    """One line for each run that could not be read, so that a page over the others says what it left out."""
    for label, error in zip(table["label"], table["error"]):
        if isinstance(error, str):
            st.warning(f"Left out {label}: {error}", icon=":material/error:")


def keyed_multiselect(label: str, options: list, store: str, default: list, format_func, **kwargs) -> list:
    """A multiselect that never drops a pick: keyed, with its value seeded once from session_state[store]
    (what another page handed over) or `default`, and never given a default that changes between reruns,
    which would make Streamlit treat it as a new widget and forget the user's last pick."""
    widget = f"{store}_widget"
    if widget not in st.session_state:
        kept = [o for o in st.session_state.get(store, []) if o in options]
        st.session_state[widget] = kept or [o for o in default if o in options]
    else:
        st.session_state[widget] = [o for o in st.session_state[widget] if o in options]
    chosen = st.multiselect(label, options, key=widget, format_func=format_func, **kwargs)
    st.session_state[store] = chosen
    return chosen


def pick_run(table: pd.DataFrame, label: str = "Run", only=None) -> str | None:
    """A selectbox over the readable runs; remembers the choice across pages. A multi-rank run
    gets a second selectbox for its rank (the largest rank first), since these pages show one trace."""
    ok = readable(table)
    if only is not None:
        ok = ok[only(ok)]
    paths = ok["run"].tolist()
    if not paths:
        st.info(f"No readable runs under {literal(data.traces_dir())}.")
        return None
    names = labels(ok)
    current = st.session_state.get(CURRENT)
    job = str(layout.run_root_of(current)) if current else None
    index = paths.index(current) if current in paths else paths.index(job) if job in paths else 0
    choice = st.selectbox(label, paths, index=index, format_func=names.__getitem__)
    parts = [str(p) for p in layout.rank_dirs(choice)]
    if parts:
        first = data.single_run(choice)
        index = parts.index(current) if current in parts else parts.index(first) if first in parts else 0
        choice = st.selectbox("Rank", parts, index=index, format_func=lambda p: Path(p).name)
    st.session_state[CURRENT] = choice
    return choice


def multi_rank_runs(table: pd.DataFrame) -> pd.DataFrame:
    """The rows of multi-rank runs, readable or not (the Ranks page shows why a rank failed)."""
    return table[table["world_size"].notna()]


def load(run: str):
    """(Trace, Lifetimes) or None with the error shown."""
    from profiler.analysis.integrity import trace_warnings

    try:
        loaded = data.trace_of(run)
        warnings = trace_warnings(*loaded)  # raises where the numbers cannot be trusted
    except TraceError as exc:
        st.error(literal(exc))
        return None
    for w in warnings:
        st.warning(f"This trace does not add up: {w}")
    return loaded
