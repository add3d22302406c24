"""Cached access to the runs under VRAMSCOPE_TRACES, and the pure transforms the pages draw.

The functions without a leading `cached_` are plain: a Trace or DataFrame in, a DataFrame
out, tested without Streamlit. The `cached_` ones wrap them in st.cache_data /
st.cache_resource, keyed by the run's path and a stamp of its files, so that a live run
that keeps writing is read again while a finished one is read once.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import streamlit as st

from profiler import analysis
from profiler.analysis import ranks
from profiler.analysis.ranks import step_aligned  # noqa: F401  (the pages' name for it)
from profiler.analysis.summary import load_summary
from profiler.errors import TraceError
from profiler.trace.reader import iter_runs, load_trace

TRACES_ENV = "VRAMSCOPE_TRACES"
MAX_POINTS = 4000  # points per drawn line; downsample keeps each bucket's min and max
# A multi-rank run is one row: world_size, its per-GPU peaks (the largest rank's) and the peaks' skew.
RUN_COLUMNS = ("run", "name", "backend", "device", "preset", "toggles", "status", "world_size",
               "peak_allocated_bytes", "peak_skew_pct", "peak_reserved_bytes", "fragmentation_ratio_at_peak",
               "median_step_time_us", "run_id", "failed_ranks", "error")
MAX_RANK_LINES = 16  # rank timelines overlaid at once: more is unreadable and slow to read


def traces_dir() -> Path:
    return Path(os.environ.get(TRACES_ENV) or "traces")


def stamp(run) -> tuple:
    """What changes when a run's files do: a live run's journals grow, meta.json gets its status.
    For a multi-rank run, the files of every rank's partition."""
    parts = ranks.rank_dirs(run)
    if parts:
        return tuple((p.name, stamp(p)) for p in parts)
    try:
        with os.scandir(run) as entries:  # one stat per file: a job of 1024 ranks stamps ~10k files
            files = [(e.name, e.stat()) for e in entries if e.is_file()]
        return tuple(sorted((name, st.st_size, st.st_mtime_ns) for name, st in files))
    except OSError:
        return ()


def one_line(exc: BaseException) -> str:
    return re.sub(r"\s+", " ", str(exc) or type(exc).__name__).strip()


# -- the runs table -------------------------------------------------------------------

def world_size_of(summary: dict) -> int:
    """A job summary's world_size; a single run's from its config, else 1."""
    config = summary.get("config") if isinstance(summary.get("config"), dict) else {}
    return int(summary.get("world_size") or config.get("world_size") or 1)


def run_row(run: Path, summary: dict | None = None, error: str | None = None) -> dict:
    """One Runs-page row; a run that could not be read keeps its path and its one-line error.
    A multi-rank run's row (summary from ranks.run_group_summary) adds world_size, skew and failed ranks."""
    row = dict.fromkeys(RUN_COLUMNS)
    row.update(run=str(run), name=run.name, error=error)
    if summary is None:
        row["status"] = "unreadable"
        return row
    config = dict(summary.get("config") or {})
    preset = config.pop("preset", None)
    row.update({k: summary.get(k) for k in RUN_COLUMNS if k in summary})
    row.update(preset=preset, toggles=", ".join(f"{k}={v}" for k, v in sorted(config.items())))
    row["failed_ranks"] = ", ".join(map(str, summary.get("failed_ranks") or ())) or None
    return row


def _summary_row(run: Path, summarise) -> dict:
    try:
        return run_row(run, summarise(run))
    except TraceError as exc:
        return run_row(run, error=one_line(exc))
    except Exception as exc:  # noqa: BLE001 - one bad run must not hide the others
        return run_row(run, error=f"{run}: {type(exc).__name__}: {one_line(exc)}")


def runs_table(root) -> pd.DataFrame:
    """Every run under `root`, one row each (RUN_COLUMNS), from the cached run summaries.

    The rank=N partitions of a multi-rank run make one row, whose run is the job's directory;
    an unreadable job keeps its world_size (its partitions), so that the Ranks page can show why."""
    rows, jobs = [], set()
    root = Path(root)
    for run in iter_runs(root):
        job = ranks.run_root_of(run)
        if job == run or run == root:  # root itself a rank partition: the user asked for that one rank
            rows.append(_summary_row(run, load_summary))
        elif job not in jobs:
            jobs.add(job)
            row = _summary_row(job, ranks.run_group_summary)
            row["world_size"] = row["world_size"] or len(ranks.rank_dirs(job))
            rows.append(row)
    return pd.DataFrame(rows, columns=list(RUN_COLUMNS))


def ablation_losses(root) -> pd.DataFrame:
    """run (directory name), loss from the ablation tables (*.parquet) beside the runs, if any."""
    frames = []
    for table in sorted(Path(root).rglob("*.parquet")):
        if table.parent != Path(root) and (table.parent / "meta.json").is_file():
            continue  # a run's own tables
        try:
            df = pd.read_parquet(table, columns=["run_dir", "loss"])
        except Exception:  # noqa: BLE001 - not an ablation table
            continue
        frames.append(pd.DataFrame({"run": df["run_dir"].astype(str).map(lambda p: Path(p).name),
                                    "loss": pd.to_numeric(df["loss"], errors="coerce")}))
    if not frames:
        return pd.DataFrame({"run": [], "loss": []})
    return pd.concat(frames, ignore_index=True).drop_duplicates("run", keep="last")


# -- transforms over one trace --------------------------------------------------------

def stack_tree(live: pd.DataFrame, stacks: pd.DataFrame, frames: pd.DataFrame, top: int = 40,
               depth: int = 12) -> pd.DataFrame:
    """id, parent, label, bytes: the `top` allocation sites alive in `live` as a tree of frames,
    outermost at the root, so that an icicle's node covers the sites below it."""
    cols = ["id", "parent", "label", "bytes"]
    if live.empty:
        return pd.DataFrame(columns=cols)
    by_stack = live.assign(stack_id=live["stack_id"].astype("Int64")).groupby(
        "stack_id", dropna=False)["size_bytes"].sum().sort_values(ascending=False).head(top)
    names = {int(f): f"{fn} ({Path(str(file)).name}:{line})" for f, file, line, fn in
             zip(frames["frame_id"], frames["filename"], frames["line"], frames["function"])}
    chains = {int(s): list(f) for s, f in zip(stacks["stack_id"], stacks["frame_ids"]) if f is not None}
    nodes: dict[str, list] = {}
    for sid, size in by_stack.items():
        chain = chains.get(int(sid), []) if pd.notna(sid) else []
        path = [names.get(int(f), f"frame {f}") for f in reversed(chain)][-depth:] or ["(no stack)"]
        parent = ""
        for i, label in enumerate(path):
            node = parent + "/" + label if parent else label
            entry = nodes.setdefault(node, [node, parent, label, 0])
            entry[3] += int(size)
            parent = node
    return pd.DataFrame(list(nodes.values()), columns=cols)


def kv_table(trace) -> pd.DataFrame:
    """The run's kv rows with tokens_total (batch x tokens), unused and extra bytes."""
    kv = trace.kv.copy()
    if kv.empty:
        return kv
    kv["cache"] = kv["cache"].astype(str)
    batch = kv["batch"].fillna(1).astype(np.int64)
    kv["tokens_total"] = batch * kv["tokens"].astype(np.int64)
    kv["extra_bytes"] = kv["extra_bytes"].fillna(0).astype(np.int64)
    kv["unused_bytes"] = kv["reserved_bytes"].astype(np.int64) - kv["token_state_bytes"].astype(np.int64)
    return kv


def kv_token_bytes(kv: pd.DataFrame) -> float | None:
    """K+V bytes per token position, as the formula has them: the median of token-state bytes
    over batch x tokens (a cache that stores full-width states hits the formula exactly)."""
    ok = kv[kv["tokens_total"] > 0] if len(kv) else kv
    if ok.empty:
        return None
    return float(np.median(ok["token_state_bytes"] / ok["tokens_total"]))


def kv_waste(kvs: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Per run and cache: mean token-state, unused (reserved, no token) and extra bytes over its steps."""
    rows = []
    for name, kv in kvs.items():
        for cache, g in kv.groupby("cache", sort=True):
            rows.append({"run": name, "cache": cache,
                         "token_state_bytes": float(g["token_state_bytes"].mean()),
                         "unused_bytes": float(g["unused_bytes"].mean()),
                         "extra_bytes": float(g["extra_bytes"].mean())})
    return pd.DataFrame(rows, columns=["run", "cache", "token_state_bytes", "unused_bytes", "extra_bytes"])


# -- cached -----------------------------------------------------------------------------

@st.cache_data(show_spinner="Reading runs...")
def cached_runs_table(root: str, files: tuple = ()) -> pd.DataFrame:
    return runs_table(root)


def root_stamp(root) -> tuple:
    """Changes when any run under `root` changes (a new run, a finished one)."""
    try:
        return tuple((str(r), stamp(r)) for r in iter_runs(root))
    except TraceError:
        return ()


def single_run(run: str) -> str:
    """The run a single-run view reads: a multi-rank run's largest rank (its per-GPU peak), else the run."""
    if not ranks.rank_dirs(run):
        return run
    return str(Path(run) / f"rank={stored_summary(run)['peak_rank']}")


def trace_of(run: str):
    """The cached (Trace, Lifetimes) of the run as its files are now."""
    run = single_run(run)
    return _cached_trace_keyed(run, stamp(run))


@st.cache_resource(max_entries=16, show_spinner="Reading the trace...")
def _cached_trace_keyed(run: str, files: tuple):
    """(Trace, Lifetimes): the lifetimes are paired once and shared by every chart of the run."""
    trace = load_trace(run)
    return trace, analysis.lifetimes(trace)


@st.cache_data(max_entries=64, show_spinner=False)
def cached_ablation_losses(root: str, files: tuple = ()) -> pd.DataFrame:
    return ablation_losses(root)


@st.cache_data(max_entries=64, show_spinner=False)
def cached_summary(run: str, files: tuple) -> dict:
    """run_summary of the run as its files are now (not written to summary.json: a live run changes)."""
    trace, lt = _cached_trace_keyed(run, files)
    return analysis.run_summary(trace, lt)


def summary_of(run: str) -> dict:
    run = single_run(run)
    return cached_summary(run, stamp(run))


@st.cache_data(max_entries=256, show_spinner=False)
def cached_stored_summary(run: str, files: tuple) -> dict:
    """load_summary: summary.json when fresh, else computed (and cached beside the run); for a
    multi-rank run, ranks.run_group_summary over its ranks' summaries."""
    if ranks.rank_dirs(run):
        return ranks.run_group_summary(run, cached_rank_records(run, files))
    return load_summary(run)


def stored_summary(run: str) -> dict:
    return cached_stored_summary(run, stamp(run))


@st.cache_data(max_entries=256, show_spinner=False)
def cached_kv(run: str, files: tuple) -> pd.DataFrame:
    return kv_table(load_trace(run, tables=("kv",)))


def kv_of(run: str) -> pd.DataFrame:
    run = single_run(run)
    return cached_kv(run, stamp(run))


# -- cached: one multi-rank run -----------------------------------------------------------

@st.cache_data(max_entries=16, show_spinner="Reading the ranks...")
def cached_rank_records(run: str, files: tuple) -> list:
    """ranks.read_ranks: every rank's meta and summary, read once for the table, categories and timelines."""
    return ranks.read_ranks(run)


def rank_records_of(run: str) -> list:
    return cached_rank_records(run, stamp(run))


@st.cache_data(max_entries=32, show_spinner="Reading the ranks' timelines...")
def cached_rank_timelines(run: str, chosen: tuple, files: tuple) -> pd.DataFrame:
    return ranks.rank_timelines(run, chosen, max_points=MAX_POINTS // 2,
                                records=cached_rank_records(run, files))


def rank_timelines_of(run: str, chosen) -> pd.DataFrame:
    return cached_rank_timelines(run, tuple(int(r) for r in chosen), stamp(run))


def default_ranks(table: pd.DataFrame, skew: dict, most: int = 4) -> list[int]:
    """Ranks worth overlaying first: rank 0, the largest and the smallest peak, then the next largest."""
    readable = table[table["replayed_peak_bytes"].notna()]
    by_peak = readable.sort_values("peak_allocated_bytes", ascending=False, kind="stable")["rank"].tolist()
    picks = [0, skew.get("max_rank"), skew.get("min_rank"), *by_peak]
    ok = set(readable["rank"].tolist())
    return [int(r) for r in dict.fromkeys(p for p in picks if p in ok)][:most]


def differing_columns(df: pd.DataFrame, keep=("name",)) -> list[str]:
    """Columns whose values are not all the same (plus `keep`): the "differences only" view."""
    out = []
    for c in df.columns:
        values = df[c].astype(str)
        if c in keep or values.nunique(dropna=False) > 1:
            out.append(c)
    return out


def ablation_view(summaries: list[dict], baseline: int, losses: pd.DataFrame, runs: list[str]) -> pd.DataFrame:
    """analysis.compare_summaries against `baseline`, with each run's loss and loss_delta where an
    ablation table beside the runs has them."""
    table = analysis.compare_summaries(summaries, baseline)
    table.insert(0, "run", [Path(r).name for r in runs])
    table["world_size"] = [world_size_of(s) for s in summaries]
    loss = dict(zip(losses["run"], losses["loss"]))
    table["loss"] = [loss.get(Path(r).name) for r in runs]
    base = table["loss"].iloc[baseline]
    table["loss_delta"] = [None if v is None or base is None or pd.isna(v) or pd.isna(base) else v - base
                           for v in table["loss"]]
    front = ["run", "name", "world_size", "is_baseline", "memory_saved_pct", "speed_change_pct", "loss",
             "loss_delta", "peak_allocated_bytes", "peak_reserved_bytes", "median_step_time_us"]
    front = [c for c in front if c in table]
    return table[front + [c for c in table.columns if c not in front]]
