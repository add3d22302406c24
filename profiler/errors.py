"""Errors a user can cause, and the exit codes the CLI maps them to.

Anything derived from VramscopeError is shown as one line, with no traceback.
"""

from __future__ import annotations


class VramscopeError(Exception):
    """Base class. `exit_code` is what the CLI exits with."""

    exit_code = 2


class UsageError(VramscopeError):
    """A bad CLI argument or API call."""


class TraceError(VramscopeError):
    """A trace that cannot be read: missing, truncated, foreign or malformed."""


class TraceVersionError(TraceError):
    """A trace written by an unknown schema version."""


class EmptyTraceError(TraceError):
    """A trace that holds no data to analyse."""
