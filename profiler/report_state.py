"""How a run stands, for its report: the status to show, its steps, and what went wrong.

run_state() adds these facts to the report's "run" section (profiler.report.build_report);
steps_text() and state_lines() are their text. A run without a final status is checked
against its capture's process (profiler.trace.meta.run_status): running, died, or running?
where the process is on another host. Steps are the completed ones (analysis.summary.step_counts);
tail_step marks the partial step after them.
"""

from __future__ import annotations

from profiler.trace.schema import Status
from profiler.units import human_bytes

FINAL = tuple(s.value for s in Status)  # what a capture writes when it ends


def run_state(trace, summary: dict) -> dict:
    """How the run stands: its status as it should be shown (a run without a final status checked
    against its capture's process, profiler.trace.meta.run_status), whether a partial step follows
    the completed ones, and what meta.json says went wrong (error, capture_error, finalize_error, oom), if
    anything."""
    from profiler.trace.meta import DIED, RUNNING_ELSEWHERE, run_status

    meta = trace.meta
    state = {"status": run_status(meta), "tail_step": summary["tail_step"]}
    where = f"pid {meta.get('pid')} on {meta.get('hostname')}"
    if state["status"] == DIED:
        state["status_note"] = (
            f"the capture's process ({where}) ended without a final status: killed or crashed; "
            "its trace is read from the journals it wrote"
        )
    elif state["status"] == RUNNING_ELSEWHERE:
        state["status_note"] = f"no final status yet; the capture's process ({where}) cannot be checked from here"
    state.update({k: meta[k] for k in ("error", "capture_error", "finalize_error", "oom") if meta.get(k)})
    return state


def steps_text(run: dict) -> str:
    """The completed steps, and the partial one after them: the tail of a finished capture
    (events after the last optimizer step), else the step that never ended."""
    if not run.get("tail_step"):
        return f"{run['steps']:,}"
    return f"{run['steps']:,} (+ {'tail' if run['status'] in FINAL else '1 unfinished'})"


def state_lines(run: dict) -> list[str]:
    """The lines under the status line: why a run without a final status is shown so, and its errors."""
    lines = [f"  {run['status_note']}"] if run.get("status_note") else []
    lines += [
        f"  {label}: {run[key]}"
        for key, label in (
            ("error", "error"),
            ("capture_error", "capture stopped"),
            ("finalize_error", "finalize error"),
        )
        if run.get(key)
    ]
    oom = run.get("oom")
    if isinstance(oom, dict):
        lines.append(
            f"  out of memory: {human_bytes(oom.get('requested_bytes'))} requested on device {oom.get('device')}"
            f" at step {oom.get('step')}, with {human_bytes(oom.get('device_allocated_bytes'))} allocated and"
            f" {human_bytes(oom.get('device_free_bytes'))} free"
        )
    return lines
