"""What every page shares: the import path, the runs folder and the run picker."""

from __future__ import annotations

import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[2]
if str(_ROOT) not in sys.path:  # a page run on its own (AppTest) has only pages/ on the path
    sys.path.insert(0, str(_ROOT))

import pandas as pd  # noqa: E402
import streamlit as st  # noqa: E402

from dashboard import data  # noqa: E402
from profiler.errors import TraceError  # noqa: E402

CURRENT = "current_run"  # session key: the run the single-run pages show
SELECTED = "compare_runs"  # session key: the runs the Runs page hands to Compare


def runs() -> pd.DataFrame:
    """The runs table of VRAMSCOPE_TRACES (empty, with an error shown, if the folder is missing)."""
    root = data.traces_dir()
    try:
        return data.cached_runs_table(str(root), data.root_stamp(root))
    except TraceError as exc:
        st.error(data.one_line(exc))
        return pd.DataFrame(columns=list(data.RUN_COLUMNS))


def readable(table: pd.DataFrame) -> pd.DataFrame:
    return table[table["error"].isna()]


def pick_run(table: pd.DataFrame, label: str = "Run", only=None) -> str | None:
    """A selectbox over the readable runs; remembers the choice across pages."""
    ok = readable(table)
    if only is not None:
        ok = ok[only(ok)]
    paths = ok["run"].tolist()
    if not paths:
        st.info(f"No readable runs under {data.traces_dir()}.")
        return None
    names = dict(zip(ok["run"], ok["name"]))
    current = st.session_state.get(CURRENT)
    index = paths.index(current) if current in paths else 0
    choice = st.selectbox(label, paths, index=index, format_func=lambda p: f"{names[p]}  ({p})")
    st.session_state[CURRENT] = choice
    return choice


def load(run: str):
    """(Trace, Lifetimes) or None with the error shown."""
    try:
        return data.trace_of(run)
    except TraceError as exc:
        st.error(data.one_line(exc))
        return None
