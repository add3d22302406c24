"""Errors a user can cause, and the exit codes the CLI maps them to.

Anything derived from VramscopeError is shown as one line, with no traceback.
"""

from __future__ import annotations


class VramscopeError(Exception):
    """Base class. `exit_code` is what the CLI exits with."""

    exit_code = 2


class UsageError(VramscopeError):
    """A bad CLI argument or API call."""


class RunDirectoryExists(UsageError):
    """A capture asked to write into a run directory that exists (another run's)."""


class TraceError(VramscopeError):
    """A trace that cannot be read: missing, truncated, foreign or malformed."""


class TraceVersionError(TraceError):
    """A trace written by an unknown schema version."""


class EmptyTraceError(TraceError):
    """A trace that holds no data to analyse."""


MAX_MESSAGE = 400


def one_line(what: str | BaseException, limit: int = MAX_MESSAGE) -> str:
    """One line for a user: whitespace folded, at most `limit` characters.

    An exception reads "Type: message" (just "Type" when it has no message). Arrow,
    JSON and torch messages span lines; every one-line error and warning comes here.
    """
    if isinstance(what, BaseException):
        text = " ".join(str(what).split())
        line = f"{type(what).__name__}: {text}" if text else type(what).__name__
    else:
        line = " ".join(str(what).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."
