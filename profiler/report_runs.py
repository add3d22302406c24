"""The report of a folder of runs (`vramscope report OUT`): one row per run, as plain values.

A run is listed from its cached summary (profiler.trace.summary_cache), so a folder of large
runs costs a small JSON file per run once each was summarised; a multi-rank job is one row
(profiler.trace.layout.run_group_summary: its largest rank's peak, its fewest steps). A run
that cannot be read keeps its row, with its one-line error. Status is as `vramscope report`
shows it: a run without a final status is checked against its capture's process.
"""

from __future__ import annotations

import json
from pathlib import Path

from profiler.errors import TraceError, one_line
from profiler.units import human_bytes

ROW_KEYS = ("name", "status", "peak_allocated_bytes", "steps", "tail_step", "world_size", "path", "error")


def is_folder_of_runs(path) -> bool:
    """Whether `path` is a directory that is neither a run (no meta.json) nor a multi-rank job."""
    from profiler.trace import layout, schema

    path = Path(path)
    return path.is_dir() and not (path / schema.META_FILE).is_file() and not layout.is_multi_rank(path)


def runs_report(root) -> list[dict]:
    """A row (ROW_KEYS) for every run and job under `root`; TraceError when there is none."""
    from profiler.trace import layout
    from profiler.trace.summary_cache import load_summary

    rows, jobs = [], set()
    for run in layout.iter_runs(root):
        job = layout.run_root_of(run)
        if job == run:
            rows.append(_row(run, load_summary))
        elif job not in jobs:
            jobs.add(job)
            rows.append(_row(job, layout.run_group_summary))
    if not rows:
        raise TraceError(f"{root}: no vramscope runs here (a run is a directory holding meta.json)")
    return rows


def _row(path: Path, summarise) -> dict:
    from profiler.trace import layout

    row = dict.fromkeys(ROW_KEYS)
    row.update(name=path.name, path=str(path))
    try:
        summary = summarise(path)
    except TraceError as exc:  # its message names the run
        return row | {"status": "unreadable", "error": one_line(str(exc))}
    except Exception as exc:  # noqa: BLE001 - one bad run must not hide the others
        return row | {"status": "unreadable", "error": one_line(f"{path}: {one_line(exc)}")}
    row.update({k: summary.get(k) for k in ROW_KEYS if k in summary and k not in ("path", "error")})
    row["status"] = layout.shown_status(path, summary.get("status"))
    return row


def render_runs(rows: list[dict]) -> str:
    """The rows as an aligned table, then the errors of the runs that could not be read."""
    from profiler.report import text_table
    from profiler.report_state import steps_text

    cells = [
        [
            r["name"] or "",
            r["status"] or "",
            human_bytes(r["peak_allocated_bytes"]) if r["peak_allocated_bytes"] is not None else "",
            "" if r["steps"] is None else steps_text(r),
            r["path"],
        ]
        for r in rows
    ]
    lines = [f"vramscope runs: {len(rows)}"] + text_table(
        ["name", "status", "peak allocated", "steps", "path"], cells, {2, 3}
    )
    return "\n".join(lines + [f"  unreadable: {r['error']}" for r in rows if r["error"]])


def to_json(rows: list[dict]) -> str:
    return json.dumps(rows, indent=1)
