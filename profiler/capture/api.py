"""The module-level capture API: calls that reach the process's active capture, if any.

`profiler.mark(...)`, `profiler.step()`, `profiler.category(...)`,
`profiler.record_kv(...)` and `profiler.register_model(...)` are no-ops without
an active capture, so library code can call them unconditionally.
"""

from __future__ import annotations

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


class category:  # noqa: N801 - used as a function: `with profiler.category("kv_cache"):`
    """Stamp allocations made inside the block with a category (e.g. "kv_cache").

    A class rather than a generator: it runs in hot loops (a KV cache's update, once per
    layer per token), where a generator-based context manager costs a few microseconds."""

    __slots__ = ("name", "_prof", "_previous")

    def __init__(self, name: str) -> None:
        self.name = name
        self._prof: Profiler | None = None
        self._previous: str | None = None

    def __enter__(self) -> None:
        prof = _ACTIVE
        if prof is not None:
            self._prof, self._previous = prof, prof.push_category(self.name)

    def __exit__(self, *exc) -> None:
        prof, self._prof = self._prof, None
        if prof is not None:
            prof.pop_category(self._previous)
