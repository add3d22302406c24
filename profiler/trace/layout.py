"""Where runs are on disk: run directories, a multi-rank run's partitions, and meta.json.

A run is a directory holding meta.json. A distributed capture writes one run per rank:

    <out>/<run_id>/rank=0/   a normal single-process run (meta.json carries rank, world_size, ...)
    <out>/<run_id>/rank=1/
    ...

Runs are found at a folder or up to three levels below it (an ablation's folder of jobs
of ranks). meta.json is read here and only here: read_meta() checks it as the reader
needs it (profiler.trace.meta). read_ranks() reads every rank of a job as a RankRecord
(profiler.trace.model); the functions at the end load what profiler.analysis.ranks computes on.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from profiler.errors import TraceError, one_line
from profiler.trace import schema
from profiler.trace.meta import DIED, RUNNING, RUNNING_ELSEWHERE, read_meta_lenient, run_status, world_size_of
from profiler.trace.model import MISSING, UNREADABLE, RankRecord  # noqa: F401  (what read_ranks returns)
from profiler.trace.problems import trace_error

# -- runs under a folder ----------------------------------------------------------------


def iter_runs(root) -> list[Path]:
    """Run directories (holding meta.json) at `root` or up to three levels below it:
    <run_id>/, <group>/<run_id>/ (an ablation's folder), and each of those as a
    multi-rank job, <...>/<run_id>/rank=N/."""
    root = Path(root)
    if not root.is_dir():
        raise trace_error(root, "no such directory" if not root.exists() else "not a directory")
    found = []
    level = [root]
    for _depth in range(4):
        runs = [d for d in level if (d / schema.META_FILE).is_file()]
        found += runs
        level = [c for d in level if d not in runs for c in _subdirs(d)]  # a run holds no runs
    return sorted(found, key=_natural_key)


def _subdirs(folder: Path) -> list[Path]:
    try:
        return [c for c in folder.iterdir() if c.is_dir() and not c.name.startswith(".")]
    except OSError:
        return []  # an unreadable folder holds no runs we could load anyway


def _natural_key(path: Path) -> list:
    # rank=10 after rank=9, not after rank=1.
    return [[int(p) if p.isdigit() else p for p in re.split(r"(\d+)", part)] for part in path.parts]


def load_runs(root, tables: Iterable[str] | None = None) -> list[tuple[Path, object]]:
    """Every run under `root`, each as a loaded Trace or the TraceError that stopped it."""
    from profiler.trace.reader import load_trace  # pandas only once traces are read

    out: list[tuple[Path, object]] = []
    for run in iter_runs(root):
        try:
            out.append((run, load_trace(run, tables)))
        except TraceError as exc:
            out.append((run, exc))
    return out


# -- a multi-rank run's partitions --------------------------------------------------------

RANK_DIR = re.compile(r"^rank=(\d+)$")


def rank_number(path) -> int | None:
    """N for a directory named rank=N, else None."""
    found = RANK_DIR.match(Path(path).name)
    return int(found.group(1)) if found else None


def rank_dirs(run_root) -> list[Path]:
    """The rank=N partitions of one multi-rank run, sorted by N (rank=10 after rank=9). A directory
    holding meta.json is one run and has none, whatever folders it holds: a run holds no runs."""
    root = Path(run_root)
    if os.path.lexists(root / schema.META_FILE):
        return []
    try:
        numbered = [(n, c) for c in root.iterdir() if c.is_dir() and (n := rank_number(c)) is not None]
    except OSError:
        return []
    return [c for _, c in sorted(numbered, key=lambda pair: pair[0])]


def run_root_of(path) -> Path:
    """The run directory a rank partition belongs to (its parent); any other path as it is."""
    path = Path(path)
    return path.parent if rank_number(path) is not None else path


def is_multi_rank(path) -> bool:
    """Whether `path` is a multi-rank run (it holds rank=N partitions) or one of its partitions."""
    return bool(rank_dirs(run_root_of(path)))


def shown_status(path, recorded: str | None) -> str:
    """The status to show for the run or multi-rank job at `path`, whose trace or summary says
    `recorded`: a final status as it is; "running" checked against the capture's process
    (meta.run_status): died, running, or running? where it cannot be checked. A job runs while
    any rank does and died once any rank died without a final status."""
    if recorded not in (None, RUNNING):
        return recorded
    parts = rank_dirs(path) if rank_number(path) is None else []
    if not parts:
        return run_status(read_meta_lenient(path))
    found = {run_status(read_meta_lenient(p)) for p in parts}
    return next((s for s in (DIED, RUNNING, RUNNING_ELSEWHERE) if s in found), RUNNING)


# -- reading every rank -------------------------------------------------------------------

_MAX_READERS = 8


def _read_rank(run_dir: Path) -> RankRecord:
    from profiler.trace.summary_cache import load_summary

    rank = rank_number(run_dir)
    assert rank is not None  # rank_dirs lists only rank=N directories
    summary, error = None, None
    try:
        summary = load_summary(run_dir)
    except TraceError as exc:
        error = one_line(str(exc))
    except Exception as exc:  # noqa: BLE001 - one bad rank must not hide the others
        error = one_line(f"{run_dir}: {type(exc).__name__}: {exc}")
    return RankRecord(rank, run_dir, read_meta_lenient(run_dir), summary, error)


def read_ranks(run_root) -> list[RankRecord]:
    """Every rank of the run, in rank order, including those world_size expects but no partition holds.

    A rank's summary comes from its summary.json when fresh (summary_cache.load_summary), so
    that a job of 1024 ranks costs 1024 small JSON files once their summaries are cached.
    """
    root = run_root_of(run_root)
    dirs = rank_dirs(root)
    # Threads: a rank without a cached summary is read and summarised once, and that work (Arrow
    # decoding, file I/O) releases the GIL often enough to overlap.
    workers = min(_MAX_READERS, os.cpu_count() or 1, len(dirs))
    if workers > 1:
        with ThreadPoolExecutor(workers) as pool:
            found = list(pool.map(_read_rank, dirs))
    else:
        found = [_read_rank(d) for d in dirs]
    sizes = [s for s in (world_size_of(r.meta) for r in found) if s]
    world = max(sizes + [r.rank + 1 for r in found], default=0)
    present = {r.rank for r in found}
    missing = [
        RankRecord(
            r,
            root / f"rank={r}",
            None,
            None,
            f"{root}: no partition rank={r} (world size {world}): the rank never wrote a trace",
            exists=False,
        )
        for r in range(world)
        if r not in present
    ]
    return sorted(found + missing, key=lambda r: r.rank)


# -- a multi-rank run's views, read from disk ---------------------------------------------
# Each reads the ranks (unless `records` are given) and hands them to profiler.analysis.ranks.


def _records(run_root, records) -> list[RankRecord]:
    return list(records) if records is not None else read_ranks(run_root)


def rank_table(run_root, records: list[RankRecord] | None = None):
    """analysis.ranks.rank_table_of the run's ranks."""
    from profiler.analysis import ranks

    return ranks.rank_table_of(_records(run_root, records))


def rank_categories(run_root, ranks=None, records: list[RankRecord] | None = None):
    """analysis.ranks.rank_categories_of the run's ranks (`ranks`: the rank numbers, default all)."""
    from profiler.analysis.ranks import rank_categories_of

    return rank_categories_of(_records(run_root, records), ranks)


def rank_timelines(run_root, ranks=None, max_points: int = 2000, records: list[RankRecord] | None = None):
    """analysis.ranks.rank_timelines_of each readable rank's trace (`ranks`: the rank numbers to
    read, default every readable rank); a rank that cannot be loaded is left out, never raised."""
    from profiler.analysis.ranks import TIMELINE_TABLES, rank_timelines_of, readable_ranks
    from profiler.trace.reader import load_trace

    traces = []
    for r in readable_ranks(_records(run_root, records), ranks):
        try:
            traces.append((r.rank, load_trace(r.path, tables=TIMELINE_TABLES)))
        except TraceError:
            continue  # changed since its summary was read; the rank table shows why
    return rank_timelines_of(traces, max_points=max_points)


def run_group_summary(run_root, records: list[RankRecord] | None = None) -> dict:
    """analysis.ranks.run_group_summary_of the run's ranks: the job as one run summary."""
    from profiler.analysis.ranks import run_group_summary_of

    root = run_root_of(run_root)
    return run_group_summary_of(_records(root, records), root)
