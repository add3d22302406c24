"""Whether a trace's numbers can be trusted: checks of its events against its steps and its own counters.

A trace can be readable and still wrong: a file edited or cut by hand, another tool's output, a
bug. The reader checks types and ranges of each table (profiler.trace.reader); these checks look
across tables and at the replay, and come in two strengths:
- warnings: the numbers stand, but something in the trace does not add up, and the report and
  the dashboard say so in one line each (events whose steps lie outside the steps table, frees
  that match no earlier allocation and no block alive when capture began);
- UntrustedTrace (a TraceError, exit 2): the figures the report would print contradict each
  other (allocated bytes below zero, byte sums beyond int64, a module holding more at the peak
  than the peak itself).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from profiler.analysis.columns import ALLOC, FREE_COMPLETED, FREE_REQUESTED, event_bytes, event_kinds, int_column
from profiler.analysis.live import Lifetimes
from profiler.errors import TraceError, one_line
from profiler.units import exact_bytes

# Byte sums past this could wrap the int64 counters.
_SUM_LIMIT = float(1 << 62)


class UntrustedTrace(TraceError):
    """The trace's figures contradict each other: no number of it is shown."""


def trace_warnings(trace, lt: Lifetimes) -> list[str]:
    """One line per thing that does not add up; raises UntrustedTrace where the counters break."""
    _check_counters(trace, lt)
    return [w for w in (_step_warning(trace), _unmatched_free_warning(trace)) if w]


def check_module_peaks(trace, modules: pd.DataFrame, peak_bytes: int) -> None:
    """Raise UntrustedTrace when the modules hold more at the peak than the peak (module_table's
    peak_contribution_bytes are of the allocations alive at the peak, so they sum to at most it)."""
    held = int_column(modules, "peak_contribution_bytes") if len(modules) else np.zeros(0, np.int64)
    if len(held) and (held.max() > peak_bytes or held.sum() > peak_bytes):
        worst = int(np.argmax(held))
        raise _untrusted(
            trace,
            f"module {modules['module'].iloc[worst]} holds {exact_bytes(int(held[worst]))} at the peak and the "
            f"modules together {exact_bytes(int(held.sum()))}, more than the peak of {exact_bytes(peak_bytes)}",
        )


def _untrusted(trace, what: str) -> UntrustedTrace:
    return UntrustedTrace(one_line(f"{trace.path}: the trace's numbers cannot be trusted: {what}"))


def _check_counters(trace, lt: Lifetimes) -> None:
    size = event_bytes(trace.events)
    total = float(np.sum(size, dtype=np.float64)) + float(trace.baseline_bytes)
    if total >= _SUM_LIMIT:
        raise _untrusted(trace, f"its events move {total:.3g} bytes, beyond what a 64-bit counter holds")
    low = int(lt.allocated_bytes.min()) if len(lt.allocated_bytes) else 0
    if low < 0:
        at = int(np.argmin(lt.allocated_bytes))
        raise _untrusted(trace, f"allocated bytes fall to {low:,} B at event {at:,}: frees exceed what was allocated")


def _step_warning(trace) -> str | None:
    steps = int_column(trace.events, "step", -1)
    if not len(steps):
        return None
    rows = int_column(trace.steps, "step")
    # Events after the last boundary belong to the step in progress (or the tail): one past it.
    last = int(rows.max()) + 1 if len(rows) else 0
    outside = (steps < 0) | (steps > last)
    if not outside.any():
        return None
    bad = steps[outside]
    return (
        f"{int(outside.sum()):,} event(s) have steps outside the steps table (0..{last}): "
        f"from {int(bad.min()):,} to {int(bad.max()):,}"
    )


def _unmatched_free_warning(trace) -> str | None:
    """Frees at an address before any alloc there, where no block was alive when capture began."""
    ev = trace.events
    kinds = event_kinds(ev)
    frees = np.flatnonzero((kinds == FREE_REQUESTED) | (kinds == FREE_COMPLETED))
    if not len(frees):
        return None
    addr = int_column(ev, "addr")
    allocs = np.flatnonzero(kinds == ALLOC)
    first_alloc = pd.Series(allocs).groupby(addr[allocs]).min() if len(allocs) else pd.Series(dtype=np.int64)
    first = first_alloc.reindex(addr[frees]).to_numpy(dtype=float, na_value=np.inf)
    early = frees[frees < first]
    start = _start_addresses(trace)
    unmatched = early[~np.isin(addr[early], start)]
    if not len(unmatched):
        return None
    freed = int(event_bytes(ev)[unmatched].sum())
    return (
        f"{len(unmatched):,} free(s) match no earlier allocation nor a block alive when capture began "
        f"({exact_bytes(freed)} counted as freed)"
    )


def _start_addresses(trace) -> np.ndarray:
    seg = trace.segments
    if seg.empty:
        return np.zeros(0, np.int64)
    start = seg[(seg["snapshot"] == "start") & (seg["state"] != "inactive")]
    return int_column(start, "block_addr")
