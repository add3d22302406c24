"""Which trace entries of a snapshot to import: `vramscope import --since/--until`.

A bound is a time from the snapshot's first entry ("90s", "250ms", "1500us") or an entry
number ("120000", counted from 0 in the device's trace). The window is half-open: entries
at or after --since and before --until. A snapshot has no steps, so an entry number is
how a part of a huge file is named when times mean little.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from profiler.errors import UsageError

_BOUND = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(s|ms|us)?\s*$")
_US_PER = {"s": 1_000_000, "ms": 1_000, "us": 1}
_MAX_BOUND = 1 << 62


@dataclass(frozen=True)
class Bound:
    value: int  # microseconds from the first entry, or an entry number
    is_time: bool


def parse_bound(text: str) -> Bound:
    """A --since/--until value; a UsageError says what a bound looks like."""
    found = _BOUND.match(text or "")
    if not found:
        raise UsageError(
            f"{text!r} is not a window bound: give an entry number (120000) or a time (90s, 250ms, 1500us)"
        )
    number, unit = found.groups()
    if unit is None:
        if "." in number:
            raise UsageError(f"{text!r}: an entry number is a whole number (or add s, ms or us for a time)")
        value, is_time = int(number), False
    else:
        value, is_time = round(float(number) * _US_PER[unit]), True
    if value >= _MAX_BOUND:
        raise UsageError(f"{text!r} is too large for a window bound")
    return Bound(value, is_time)


def entry_range(times: list[int], since: Bound | None, until: Bound | None) -> tuple[int, int]:
    """(first, end) entry indices of the window over entries whose time_us are `times`."""
    n = len(times)
    t0 = times[0] if n else 0
    return _index(times, t0, since, 0), max(_index(times, t0, until, n), _index(times, t0, since, 0))


def _index(times: list[int], t0: int, bound: Bound | None, default: int) -> int:
    if bound is None:
        return default
    if not bound.is_time:
        return min(bound.value, len(times))
    # Times are the allocator's clock and may step back a little: the first entry at or past it.
    return next((i for i, t in enumerate(times) if t - t0 >= bound.value), len(times))
