"""When the capture itself fails: it stops, and the script runs on.

Every way into the capture from the script's own work (module, optimizer and
backward hooks, `profiler.step()` and the other module-level calls) goes through
`guarded`. An error of ours there (a full disk, a permission, a bug) must never
reach the script: the capture takes its hooks out, stops recording, says so once
on stderr and in meta.json (`status: capture_failed`, `capture_error`), and the
hook returns as if nothing had happened. When the capture is left, it publishes
what reached disk before the failure (profiler.capture.session).
"""

from __future__ import annotations

import contextlib
import functools
import json
import sys
from collections.abc import Callable
from typing import Any, TypeVar

from profiler.capture import api
from profiler.errors import one_line
from profiler.trace.schema import META_FILE, Status

F = TypeVar("F", bound=Callable[..., Any])


def guarded(method: F) -> F:
    """A session method the script's work calls: a no-op unless the capture is running,
    and an error inside it stops the capture instead of reaching the caller. Either way it
    returns None; what a caller does with that goes through guarded methods, no-ops by then."""

    @functools.wraps(method)
    def call(session, *args, **kwargs):
        if not session.capturing:
            return None
        try:
            return method(session, *args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - ours, whatever it is: the script must run on
            session.capture_failed(exc)
            return None

    return call  # type: ignore[return-value]


def stop_capture(session, error: BaseException) -> None:
    """Stop `session` (a running Profiler) after an error of ours, so that it never reaches the
    script. Optimizer hooks stay, inert, until the capture is left: a failure in one of them runs
    while torch iterates over them."""
    if session.failure is not None or not session.capturing:
        return
    session.capturing = False
    session.failure = one_line(error)
    if api.active() is session:
        api.deactivate()
    stop(session._parts, session._unhook, session.failure, session.step_index)


def check_recording(session) -> None:
    """Stop `session` if its backend stopped recording on an error of ours since the last drain."""
    error = getattr(session._parts.backend, "failure", None) if session.capturing else None
    if error is not None:
        stop_capture(session, error)


def failed_meta(reason: str, steps_completed: int) -> dict:
    """What meta.json says of a capture that stopped: no longer running, and why."""
    return {"status": Status.CAPTURE_FAILED.value, "capture_error": reason, "steps_completed": steps_completed}


def stop(run, teardown: Callable[[], None], reason: str, step: int) -> None:
    """Take the capture `run` (its CaptureParts) apart after a failure: `teardown` takes the
    session's hooks out, recording stops, what was gathered is written if it can be, journals
    are closed, and meta.json and one line on stderr say why."""
    writer = run.writer
    # What was gathered still goes out, unless writing is what failed (then it fails again, at once).
    quietly(teardown, lambda: run.feed.drain(step), run.backend.stop, writer.flush, writer.abandon)
    _write_meta_anyhow(writer, failed_meta(reason, step))
    warn_stopped(reason, step, writer.run_dir)


def publish(writer, reason: str, step: int) -> None:
    """As the script leaves a capture that failed: its tables, from the journals it kept."""
    meta = failed_meta(reason, step)
    try:
        writer.finalize(meta["status"], meta)
    except Exception as e:  # noqa: BLE001 - the journals stay, and still load
        _write_meta_anyhow(writer, dict(meta, finalize_error=one_line(e)))


def _write_meta_anyhow(writer, updates: dict) -> None:
    """meta.json with `updates`, even on a full disk: where there is no room for the temporary
    copy that makes the write atomic, the file is rewritten in its own blocks."""
    try:
        writer.update_meta(updates)
        return
    except Exception:  # noqa: BLE001 - try the other way
        pass
    with contextlib.suppress(Exception):
        data = json.dumps(writer.meta, indent=1, sort_keys=True, default=str).encode()
        with open(writer.run_dir / META_FILE, "r+b") as f:
            f.write(data)
            f.truncate()


def warn_stopped(reason: str, step: int, run_dir) -> None:
    """The one line the script's user reads about it."""
    with contextlib.suppress(Exception):  # a closed stderr must not fail the script either
        print(
            f"vramscope: warning: the capture stopped at step {step} ({reason}); "
            f"the script runs on, and the trace up to there is in {run_dir}",
            file=sys.stderr,
            flush=True,
        )


def quietly(*steps: Callable[[], object]) -> None:
    """Run each step, each whatever the others did: taking a failed capture apart."""
    for step in steps:
        with contextlib.suppress(Exception):
            step()
