"""The writer's own thread (TraceWriter's write_behind): it runs the flushes handed to it,
in order, while the profiled thread goes on. Only standard-library threads and a queue."""

from __future__ import annotations

import os
import queue
import threading

QUEUED = 4  # flushes queued at most: a fifth waits for the first to be written


class WriteBehind:
    """One thread that runs the flushes handed to it, in order (TraceWriter's write_behind).
    After a write fails, the rest are dropped and the error is raised to the caller."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self._queue: queue.Queue = queue.Queue(maxsize=QUEUED)
        self._error: BaseException | None = None
        self._dropping = False
        self._thread = threading.Thread(target=self._run, name="vramscope-journals", daemon=True)
        self._thread.start()

    def submit(self, write) -> None:
        self._raise()
        self._queue.put(write)  # waits while QUEUED flushes are queued

    def wait(self, raise_error: bool = True) -> None:
        """Until every flush handed over is written; raises a write's error (or keeps it for
        the next call that raises)."""
        self._queue.join()
        if raise_error:
            self._raise()

    def stop(self, drop_queued: bool = False) -> None:
        """Write what is queued (or drop it), end the thread; raises a write's error."""
        self._dropping = drop_queued
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        if not drop_queued:
            self._raise()

    def _raise(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            self._dropping = True  # nothing more is written: the journals end where the error left them
            raise error

    def _run(self) -> None:
        while True:
            write = self._queue.get()
            try:
                if write is None:
                    return
                if not self._dropping and self._error is None:
                    write()
            except BaseException as e:  # noqa: BLE001 - handed to the caller at its next flush
                self._error = e
            finally:
                self._queue.task_done()
