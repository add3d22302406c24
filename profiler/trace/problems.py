"""What is wrong with a run on disk, as one TraceError line naming the run.

A trace on disk is input we do not control: a killed process, a full disk, a copy
cut short or a file from another tool. Whatever reading it raises becomes a
TraceError whose one line says which run, what was being read and what went wrong.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from profiler.errors import TraceError, one_line


def trace_error(run: Path, what: str, cls: type[TraceError] = TraceError) -> TraceError:
    return cls(one_line(f"{run}: {what}"))


@contextlib.contextmanager
def reading(run: Path, what: str) -> Iterator[None]:
    """Turn whatever corrupt input raises into a TraceError that says what was being read."""
    try:
        yield
    except TraceError:
        raise
    except RecursionError:
        raise trace_error(run, f"{what}: nested too deeply") from None
    except Exception as exc:  # noqa: BLE001 - corrupt bytes surface as almost any type
        raise trace_error(run, f"{what}: {_describe(exc)}") from exc


def _describe(exc: BaseException) -> str:
    if isinstance(exc, FileNotFoundError):
        return "file disappeared while reading"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if isinstance(exc, (KeyError, IndexError)) else text


def show(value) -> str:
    """A value from a file, short enough for an error line."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def is_int(value) -> bool:
    # JSON true would otherwise pass as 1.
    return isinstance(value, int) and not isinstance(value, bool)


# A table beyond this is not one vramscope wrote (ten million events take about 30 MB).
MAX_FILE_BYTES = 64 << 30


def check_regular(run: Path, name: str, limit: int = MAX_FILE_BYTES) -> None:
    """Raise unless run/name is a regular file (a symlink to one counts) of at most `limit` bytes:
    a FIFO blocks its reader forever, and /dev/zero never ends."""
    try:
        st = os.stat(run / name)
    except OSError as exc:
        raise trace_error(run, f"{name}: {_describe(exc)}") from None
    if not stat.S_ISREG(st.st_mode):
        raise trace_error(run, f"{name} is not a regular file")
    if st.st_size > limit:
        raise trace_error(run, f"{name} is {st.st_size:,} bytes, more than a trace file holds (at most {limit:,})")


MAX_JSON_BYTES = 64 << 20  # meta.json and summary.json are a few kilobytes


def read_small(path: Path, limit: int = MAX_JSON_BYTES) -> bytes:
    """The bytes of a small regular file; OSError for anything else (a FIFO, a device, a huge file)."""
    with open(path, "rb", opener=_nonblocking) as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise OSError(f"{path.name} is not a regular file")
        if st.st_size > limit:
            raise OSError(f"{path.name} is {st.st_size:,} bytes, more than a trace file of its kind holds")
        return f.read(limit + 1)[:limit]


def _nonblocking(path, flags: int) -> int:
    # Opening a FIFO for reading blocks until a writer comes: O_NONBLOCK returns at once.
    return os.open(path, flags | getattr(os, "O_NONBLOCK", 0))
