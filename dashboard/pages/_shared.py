"""What every page shares: the runs folder, the run pickers, the headline and how tables show numbers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import streamlit as st

from dashboard import data
from dashboard.text import literal
from profiler.errors import TraceError
from profiler.trace import layout

CURRENT = "current_run"  # session key: the run the single-run pages show (a rank's partition of a job)
SELECTED = "compare_runs"  # session key: the runs the Runs page hands to Compare
CURRENT_JOB = "current_job"  # session key: the multi-rank run the Ranks page shows


def runs() -> pd.DataFrame:
    """The runs table of VRAMSCOPE_TRACES (empty, with an error shown, if the folder is missing)."""
    root = data.traces_dir()
    try:
        return data.cached_runs_table(str(root), data.root_stamp(root))
    except TraceError as exc:
        st.error(literal(exc))
        return pd.DataFrame(columns=list(data.RUN_COLUMNS))


HIDDEN_COLUMNS = ("run", "label", "summary_version", "run_id")  # paths and keys: what no reader needs
_UNITS = ((1 << 40, "TiB"), (1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB"), (1, "B"))


def headline(text: str) -> None:
    """The page's answer, in one or two sentences, before its evidence (profiler.headlines)."""
    with st.container(key="headline", border=True):
        st.markdown(f"**{literal(text)}**")  # names from traces are shown as they read


def time_axis(key: str, has_steps: bool = True) -> str:
    """A switch between the time axes (figures.base.TIME_AXES): seconds, steps or events."""
    options = ["seconds", "steps", "events"] if has_steps else ["seconds", "events"]
    return st.radio("Time axis", options, horizontal=True, key=key)


def words(column: str) -> str:
    """A column name as a header: "peak_allocated_bytes" -> "peak allocated"."""
    for suffix in ("_bytes", "_us", "_pct"):
        column = column.removesuffix(suffix)
    return column.replace("_", " ").replace(".", ": ")


def show_table(table: pd.DataFrame, hide=HIDDEN_COLUMNS, **kwargs) -> None:
    """st.dataframe as a person reads it: headers in words, columns with no value dropped, bytes in
    the binary unit that suits each column (the exact bytes are in `vramscope report` and on the
    charts' hover), microseconds as milliseconds, shares and percentages with one decimal, and
    no epoch timestamps."""
    # Timestamps are epoch microseconds: the charts' time axes place a row in time, not these.
    hide = tuple(hide) + tuple(c for c in table.columns if c.startswith("ts_us"))
    d = table.drop(columns=[c for c in hide if c in table]).dropna(axis=1, how="all")
    d = d.loc[:, [not (d[c].astype(str).isin(["None", "nan", "<NA>", "NaT", ""]).all()) for c in d.columns]]
    config, out = {}, {}
    for c in d.columns:
        values = d[c]
        numeric = pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values)
        if c.endswith("_bytes") and numeric:
            top = float(np.nanmax(np.abs(values.to_numpy(dtype=float)))) if values.notna().any() else 0.0
            size, unit = next(((s, u) for s, u in _UNITS if top >= s), (1, "B"))
            out[c] = values.astype(float) / size
            config[c] = st.column_config.NumberColumn(f"{words(c)} ({unit})", format="%.2f" if size > 1 else "%d")
        elif c.endswith("_us") and numeric:
            out[c] = values.astype(float) / 1000
            config[c] = st.column_config.NumberColumn(f"{words(c)} (ms)", format="%.1f")
        elif (c.endswith("_pct") or c in ("skew_pct",)) and numeric:
            out[c] = values
            config[c] = st.column_config.NumberColumn(f"{words(c)} (%)", format="%+.1f")
        elif (c in ("share",) or c.endswith("_ratio") or "ratio_at" in c) and numeric:
            out[c] = values * 100
            config[c] = st.column_config.NumberColumn(f"{words(c)} (%)", format="%.1f")
        else:
            out[c] = values
            config[c] = st.column_config.Column(words(c))
    st.dataframe(pd.DataFrame(out, index=d.index), hide_index=True, column_config=config, **kwargs)


def readable(table: pd.DataFrame) -> pd.DataFrame:
    return table[table["error"].isna()]


def labels(table: pd.DataFrame) -> dict[str, str]:
    """run path -> what a picker shows (data.run_labels: name, folder, device, date)."""
    return dict(zip(table["run"], table["label"]))


def unreadable_note(table: pd.DataFrame) -> None:
    """One line for each run that could not be read, so that a page over the others says what it left out."""
    for label, error in zip(table["label"], table["error"]):
        if isinstance(error, str):
            st.warning(f"Left out {literal(label)}: {literal(error)}", icon=":material/error:")


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
    gets a second selectbox for its rank (the largest rank first), since these pages show one trace.
    Runs that could not be read get one line each (unreadable_note) above it."""
    unreadable_note(table)
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
