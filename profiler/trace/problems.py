"""What is wrong with a run on disk, as one TraceError line naming the run.

A trace on disk is input we do not control: a killed process, a full disk, a copy
cut short or a file from another tool. Whatever reading it raises becomes a
TraceError whose one line says which run, what was being read and what went wrong.
"""

from __future__ import annotations

import contextlib
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
