"""What a capture gathered, on its way to the writer.

The backend's events, the stacks they refer to, and the small tables (steps,
phases, modules, roles, kv) move to the writer together at each drain, so the
journals on disk always agree with one another.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from profiler.capture.backend import Backend
    from profiler.trace.writer import TraceWriter


class TraceFeed:
    """Buffers one capture's small tables and drains its backend into its writer."""

    def __init__(self, backend: Backend, writer: TraceWriter) -> None:
        self.backend = backend
        self.writer = writer
        self.events_since_boundary = 0  # events drained since the last step end
        self.last_drain = time.perf_counter()
        self._meta_at = -float("inf")  # perf_counter of the last live meta.json write
        self._rows: dict[str, list[dict]] = {}  # table -> rows, until the next drain
        self._role_cols: list[dict] = []

    def buffer(self, table: str, **row) -> None:
        self._rows.setdefault(table, []).append(row)

    def buffer_roles(self, cols: dict | None) -> None:
        if cols:
            self._role_cols.append(cols)

    def due(self, interval_s: float) -> bool:
        """True once `interval_s` passed since the last drain."""
        return time.perf_counter() - self.last_drain > interval_s

    def meta_due(self, interval_s: float) -> bool:
        """Whether to rewrite the live meta.json now: at most once per `interval_s`. A rename
        costs milliseconds on some filesystems, and a running or killed run's steps are read
        from its journals, not from meta.json (the final one is written at the end)."""
        now = time.perf_counter()
        if now - self._meta_at < interval_s:
            return False
        self._meta_at = now
        return True

    def drain(self, step: int, with_segments: bool = False) -> dict | None:
        """Move new events (labelled `step`) and buffered rows to the writer; returns the events' columns."""
        failure = getattr(self.backend, "failure", None)
        if failure is not None:  # the backend stopped recording on an error of ours: so does the capture
            raise failure
        cols = self.backend.drain(step, with_segments)
        self.last_drain = time.perf_counter()
        if cols:
            self.events_since_boundary += len(cols["ts_us"])
            self.writer.append("events", cols)
        self.push_rows()
        return cols

    def push_rows(self) -> None:
        """Move new stacks and buffered rows (not events) to the writer."""
        frames, stacks = self.backend.interner.take_new()
        if frames:
            self.writer.append("frames", frames)
        if stacks:
            self.writer.append("stacks", stacks)
        for table, rows in self._rows.items():
            if rows:
                self.writer.append(table, {k: [r.get(k) for r in rows] for k in rows[0]})
        self._rows = {}
        for cols in self._role_cols:
            self.writer.append("roles", cols)
        self._role_cols = []
