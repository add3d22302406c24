"""The module-level capture API: calls that reach the process's active capture, if any.

`profiler.mark(...)`, `profiler.step()`, `profiler.category(...)`,
`profiler.record_kv(...)` and `profiler.register_model(...)` are no-ops without
an active capture, so library code can call them unconditionally.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from profiler.capture.session import Profiler

_ACTIVE: Profiler | None = None


def activate(prof: Profiler) -> None:
    """Make `prof` the process's active capture; one at a time."""
    global _ACTIVE
    if _ACTIVE is not None:
        raise RuntimeError("a vramscope capture is already active in this process")
    _ACTIVE = prof


def deactivate() -> None:
    global _ACTIVE
    _ACTIVE = None


def active() -> Profiler | None:
    return _ACTIVE


def mark(phase: str) -> None:
    """Start a user-defined phase in the active capture (a no-op without one)."""
    if _ACTIVE is not None:
        _ACTIVE.mark(phase)


def step() -> None:
    if _ACTIVE is not None:
        _ACTIVE.step()


def register_model(model) -> str | None:
    """See Profiler.register_model (a no-op without an active capture)."""
    return _ACTIVE.register_model(model) if _ACTIVE is not None else None


def record_kv(cache, name: str | None = None) -> dict | None:
    """Record a KV cache's state now (tokens, token-state and reserved bytes).

    `cache` follows the KV protocol (a `kv_stats()` method returning a dict with
    batch, tokens, token_state_bytes, reserved_bytes and optionally extra_bytes), or
    is a transformers Cache (DynamicCache and friends), measured from its tensors.
    Returns the row, also without an active capture (so callers can test it).
    """
    from profiler.capture.kv import kv_row

    row = kv_row(cache, name)
    if _ACTIVE is not None and row is not None:
        _ACTIVE.record_kv_row(row, cache)
    return row


@contextlib.contextmanager
def category(name: str):
    """Stamp allocations made inside the block with a category (e.g. "kv_cache")."""
    prof = _ACTIVE
    if prof is None:
        yield
        return
    with prof.category(name):
        yield
