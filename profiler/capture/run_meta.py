"""What a capture adds to meta.json after its start: counters at each drain, the facts
of an out-of-memory error, and how the capture ended.

The first meta.json (backend, config, capture options) is placement.open_writer's.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import torch

from profiler.capture import distributed, signals
from profiler.trace.schema import Status

if TYPE_CHECKING:
    from profiler.capture.backend import Backend


def exit_status(exc_type, exc) -> str:
    """The run's status, from the exception (if any) that left the capture."""
    if exc_type is not None and issubclass(exc_type, torch.OutOfMemoryError):
        return Status.OOM.value
    if exc_type is not None and issubclass(exc_type, signals.Terminated):
        return Status.TERMINATED.value
    if exc_type is not None and not _is_clean_exit(exc_type, exc):
        return Status.ERROR.value
    return Status.COMPLETE.value


def _is_clean_exit(exc_type, exc) -> bool:
    return issubclass(exc_type, SystemExit) and exc.code in (0, None)


def live_meta(backend: Backend, steps_completed: int, capture_s: float) -> dict:
    """The counters that move while the capture runs, written at each drain."""
    return dict(
        events_dropped=backend.dropped,
        steps_completed=steps_completed,
        capture_host_s=round(capture_s, 6),
        **backend.peaks(),
    )


def oom_meta(device, alloc_bytes, device_allocated, device_free, step: int) -> dict:
    """The allocator's out-of-memory report (meta.json's `oom`)."""
    return dict(
        device=int(device),
        requested_bytes=int(alloc_bytes),
        device_allocated_bytes=int(device_allocated),
        device_free_bytes=int(device_free),
        step=step,
    )


def final_meta(live: dict, events_seen: int, oom: dict | None, status: str, exc) -> dict:
    """The last meta.json: `live` counters, late distributed facts, the OOM and the error."""
    final = dict(live)
    final.update(events_seen=events_seen, **distributed.late_facts())
    if oom:
        final["oom"] = oom
    if exc is not None and status != Status.COMPLETE.value:
        final["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return final


def unfinalized_meta(status: str, error: Exception, run_dir, steps_completed: int) -> dict:
    """Warn that finalizing failed; the meta.json that says so, next to the journals.

    steps_completed is written again: the last drain's count may lag, and readers tell the
    trailing partial step's row from the completed steps by it."""
    print(
        f"vramscope: warning: the trace could not be finalized ({type(error).__name__}: {error}); "
        f"its journals are kept in {run_dir} and still load",
        file=sys.stderr,
    )
    return {"status": status, "finalize_error": f"{type(error).__name__}: {error}", "steps_completed": steps_completed}
