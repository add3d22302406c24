"""Cached access to the runs under VRAMSCOPE_TRACES: what the pages read, read once per change.

The `cached_` functions wrap readers in st.cache_data / st.cache_resource, keyed by the
run's path and a stamp of its files, so that a live run that keeps writing is read again
while a finished one is read once. The numbers come from profiler.analysis; what is
defined here is where runs are and the shape of the Runs table's rows.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import streamlit as st

from profiler import analysis
from profiler.analysis import ranks
from profiler.analysis.columns import int_column

# The Compare table, under the names the dashboard's callers have used for it.
from profiler.analysis.compare import ablation_view, differing_columns  # noqa: F401
from profiler.analysis.kv import kv_table
from profiler.analysis.modules import PARTS_COLUMNS, module_parts, no_module_at_peak
from profiler.analysis.stacks import NO_STACK, site_breakdown, site_labels
from profiler.errors import TraceError, one_line
from profiler.trace import layout
from profiler.trace.meta import read_meta_lenient
from profiler.trace.reader import load_trace
from profiler.trace.summary_cache import load_summary

TRACES_ENV = "VRAMSCOPE_TRACES"
MAX_POINTS = 4000  # points per drawn line; downsample keeps each bucket's min and max
# A multi-rank run is one row: world_size, its per-GPU peaks (the largest rank's) and the peaks' skew.
RUN_COLUMNS = (
    "run",
    "name",
    "folder",
    "started",
    "backend",
    "device",
    "model",
    "toggles",
    "status",
    "steps",
    "world_size",
    "peak_allocated_bytes",
    "peak_skew_pct",
    "peak_reserved_bytes",
    "fragmentation_ratio_at_peak",
    "median_step_time_us",
    "run_id",
    "failed_ranks",
    "error",
)
MAX_RANK_LINES = 16  # rank timelines overlaid at once: more is unreadable and slow to read


def traces_dir() -> Path:
    return Path(os.environ.get(TRACES_ENV) or "traces")


def stamp(run) -> tuple:
    """What changes when a run's files do: a live run's journals grow, meta.json gets its status.
    For a multi-rank run, the files of every rank's partition."""
    parts = layout.rank_dirs(run)
    if parts:
        return tuple((p.name, stamp(p)) for p in parts)
    try:
        with os.scandir(run) as entries:  # one stat per file: a job of 1024 ranks stamps ~10k files
            files = [(e.name, e.stat()) for e in entries if e.is_file()]
        return tuple(sorted((name, st.st_size, st.st_mtime_ns) for name, st in files))
    except OSError:
        return ()


# -- the runs table -------------------------------------------------------------------


def started_at(run: Path) -> pd.Timestamp | None:
    """When the capture began (meta.json's started_at; a multi-rank run's first rank's), or None."""
    parts = layout.rank_dirs(run)
    meta = read_meta_lenient(parts[0] if parts else run) or {}
    value = meta.get("started_at")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return pd.Timestamp(value, unit="s").floor("s")


def run_row(run: Path, summary: dict | None = None, error: str | None = None, root: Path | None = None) -> dict:
    """One Runs-page row; a run that could not be read keeps its path and its one-line error.
    steps are the completed ones, as `vramscope report` counts them. folder: the run's folder
    under `root` (what tells two runs of one name apart); model: the config's model where it names
    one (a preset's model can be overridden), else the preset.
    A multi-rank run's row (summary from layout.run_group_summary) adds world_size, skew and failed ranks."""
    row = dict.fromkeys(RUN_COLUMNS)
    folder = run.parent.relative_to(root).as_posix() if root is not None and run.parent.is_relative_to(root) else ""
    row.update(run=str(run), name=run.name, folder="" if folder == "." else folder, error=error)
    row["started"] = started_at(run)
    if summary is None:
        row["status"] = "unreadable"
        return row
    config = dict(summary.get("config") or {})
    preset = config.pop("preset", None)
    model = config.pop("model", None) or preset
    row.update({k: summary.get(k) for k in RUN_COLUMNS if k in summary and k != "folder"})
    row.update(model=model, toggles=", ".join(f"{k}={v}" for k, v in sorted(config.items())))
    row["failed_ranks"] = ", ".join(map(str, summary.get("failed_ranks") or ())) or None
    row["status"] = layout.shown_status(run, row["status"])  # no final status: running, died or running?
    return row


def _summary_row(run: Path, summarise, root: Path) -> dict:
    try:
        return run_row(run, summarise(run), root=root)
    except TraceError as exc:  # its message names the run
        return run_row(run, error=one_line(str(exc)), root=root)
    except Exception as exc:  # noqa: BLE001 - one bad run must not hide the others
        return run_row(run, error=f"{run}: {one_line(exc)}", root=root)


def runs_table(root) -> pd.DataFrame:
    """Every run under `root`, one row each (RUN_COLUMNS), from the cached run summaries.

    The rank=N partitions of a multi-rank run make one row, whose run is the job's directory;
    an unreadable job keeps its world_size (its partitions), so that the Ranks page can show why."""
    rows, jobs = [], set()
    root = Path(root)
    for run in layout.iter_runs(root):
        job = layout.run_root_of(run)
        if job == run or run == root:  # root itself a rank partition: the user asked for that one rank
            rows.append(_summary_row(run, load_summary, root))
        elif job not in jobs:
            jobs.add(job)
            row = _summary_row(job, layout.run_group_summary, root)
            row["world_size"] = row["world_size"] or len(layout.rank_dirs(job))
            rows.append(row)
    table = pd.DataFrame(rows, columns=list(RUN_COLUMNS))
    table["label"] = run_labels(table)
    return table


def first_pair(table: pd.DataFrame) -> list[str]:
    """Two runs to compare before the user picks: the first two of the first folder that holds two
    (runs side by side in a folder are usually one ablation's options), else the first two."""
    for _, group in table.groupby("folder", sort=False):
        if len(group) >= 2:
            return group["run"].head(2).tolist()
    return table["run"].head(2).tolist()


def run_labels(table: pd.DataFrame) -> list[str]:
    """What a picker shows for each run: name, folder, device and date, never a path; two runs
    that would still read alike get #1, #2 in their table order."""
    labels = []
    for row in table.itertuples():
        date = row.started.strftime("%Y-%m-%d %H:%M") if pd.notna(row.started) else None
        parts = (row.name, row.folder, row.device, date)
        labels.append("  ·  ".join(str(p) for p in parts if isinstance(p, str) and p))
    counts = pd.Series(labels).value_counts()
    seen: dict[str, int] = {}
    for i, label in enumerate(labels):
        if counts[label] > 1:
            seen[label] = seen.get(label, 0) + 1
            labels[i] = f"{label}  #{seen[label]}"
    return labels


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
        frames.append(
            pd.DataFrame(
                {
                    "run": df["run_dir"].astype(str).map(lambda p: Path(p).name),
                    "loss": pd.to_numeric(df["loss"], errors="coerce"),
                }
            )
        )
    if not frames:
        return pd.DataFrame({"run": [], "loss": []})
    return pd.concat(frames, ignore_index=True).drop_duplicates("run", keep="last")


# -- cached -----------------------------------------------------------------------------


@st.cache_data(show_spinner="Reading runs...")
def cached_runs_table(root: str, files: tuple = ()) -> pd.DataFrame:
    return runs_table(root)


def root_stamp(root) -> tuple:
    """Changes when any run under `root` changes (a new run, a finished one)."""
    try:
        return tuple((str(r), stamp(r)) for r in layout.iter_runs(root))
    except TraceError:
        return ()


def single_run(run: str) -> str:
    """The run a single-run view reads: a multi-rank run's largest rank (its per-GPU peak), else the run."""
    if not layout.rank_dirs(run):
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
    multi-rank run, ranks.run_group_summary_of its ranks' summaries."""
    if layout.rank_dirs(run):
        return ranks.run_group_summary_of(cached_rank_records(run, files), Path(run))
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
    """layout.read_ranks: every rank's meta and summary, read once for the table, categories and timelines."""
    return layout.read_ranks(run)


def rank_records_of(run: str) -> list:
    return cached_rank_records(run, stamp(run))


@st.cache_data(max_entries=32, show_spinner="Reading the ranks' timelines...")
def cached_rank_timelines(run: str, chosen: tuple, files: tuple) -> pd.DataFrame:
    return layout.rank_timelines(run, chosen, max_points=MAX_POINTS // 2, records=cached_rank_records(run, files))


def rank_timelines_of(run: str, chosen) -> pd.DataFrame:
    return cached_rank_timelines(run, tuple(int(r) for r in chosen), stamp(run))


# -- cached: what the single-run pages lead with -------------------------------------------


def event_axis(trace, spans: pd.DataFrame, axis: str):
    """event indices -> the x a time axis draws them at: seconds since the first event, the
    step-aligned position (ranks.step_aligned: step number plus the fraction of its events), or
    the event numbers themselves."""
    if axis == "seconds" and len(trace.events):
        ts = int_column(trace.events, "ts_us")
        return lambda idx: (ts[np.clip(np.asarray(idx, dtype=np.int64), 0, len(ts) - 1)] - ts[0]) / 1e6
    if axis == "steps" and len(spans):
        return lambda idx: ranks.step_aligned(pd.DataFrame({"event_index": np.asarray(idx, dtype=np.int64)}), spans)
    return lambda idx: np.asarray(idx, dtype=float)


def parts_of(table: pd.DataFrame, column: str, remainder: dict | None = None) -> pd.DataFrame:
    """modules.module_parts of a module_table (empty when the run recorded no modules)."""
    if table.empty:
        return pd.DataFrame(columns=PARTS_COLUMNS)
    return module_parts(analysis.rollup(table), column, remainder)


@st.cache_data(max_entries=32, show_spinner=False)
def cached_peak_story(run: str, files: tuple) -> dict:
    trace, lt = _cached_trace_keyed(run, files)
    return peak_story(trace, lt)


def peak_story(trace, lt) -> dict:
    """What the Overview, Layers, Categories and Stacks pages lead with, computed once per run:
    the peak, its categories, its parts by module (with the bytes in no module), its sites and
    the step spans."""
    live = analysis.alive_at_peak(trace, lt)
    # The peak's parts need no sums over the run: on a long run those are most of module_table's cost.
    table = analysis.module_table(trace, lt=lt, peak_only=True)
    rest = no_module_at_peak(trace, lt)
    return {
        "peak": analysis.peak(trace, lt),
        "categories": analysis.category_at_peak(trace, lt),
        "has_modules": len(table) > 0,
        "parts": parts_of(table, "peak_contribution_bytes", rest),
        "no_module": rest,
        "sites": site_breakdown(live, trace.stacks, trace.frames),
        "spans": analysis.step_spans(trace, lt),
    }


def peak_story_of(run: str) -> dict:
    """peak_story of the run as its files are now (cached)."""
    run = single_run(run)
    return cached_peak_story(run, stamp(run))


@st.cache_data(max_entries=16, show_spinner=False)
def cached_timeline(run: str, files: tuple) -> dict:
    """The downsampled memory timeline, the phase spans and the per-step counters: what the
    Overview draws on every rerun, read once."""
    trace, lt = _cached_trace_keyed(run, files)
    return timeline_parts(trace, lt)


@st.cache_data(max_entries=16, show_spinner=False)
def cached_module_table(run: str, files: tuple) -> pd.DataFrame:
    trace, lt = _cached_trace_keyed(run, files)
    return analysis.module_table(trace, lt=lt)


def module_table_of(run: str) -> pd.DataFrame:
    """analysis.module_table of the run (every column), computed once per run."""
    run = single_run(run)
    return cached_module_table(run, stamp(run))


def timeline_parts(trace, lt) -> dict:
    return {
        "timeline": analysis.memory_timeline(trace, lt, max_points=MAX_POINTS),
        "phases": analysis.phase_spans(trace),
        "counters": analysis.allocator_counters(trace),
    }


def timeline_of(run: str) -> pd.DataFrame:
    """memory_timeline of the run, downsampled to MAX_POINTS, computed once per run."""
    return timeline_parts_of(run)["timeline"]


def timeline_parts_of(run: str) -> dict:
    run = single_run(run)
    return cached_timeline(run, stamp(run))


def blocks_with_owners(layout: pd.DataFrame, live: pd.DataFrame, stacks: pd.DataFrame, frames) -> pd.DataFrame:
    """analysis.segment_map_at's blocks with what made each one (live.live_at at the same moment,
    matched by address): module, phase and allocation site, for the segment map's hover."""
    owners = live.dropna(subset=["addr"]).drop_duplicates("addr").set_index("addr")
    sites = site_labels(stacks, frames)
    addr = layout["block_addr"]
    out = layout.copy()
    out["module"] = addr.map(owners["module"].astype(object))
    out["phase"] = addr.map(owners["phase"].astype(object))
    stack = addr.map(owners["stack_id"].astype("Int64").astype(object))
    owned = addr.isin(owners.index).to_numpy()
    out["site"] = [
        sites.get(int(s), NO_STACK) if s is not None and not pd.isna(s) else NO_STACK if mine else None
        for s, mine in zip(stack, owned)
    ]
    return out
