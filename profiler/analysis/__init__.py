"""Pure functions over a loaded Trace: a Trace in, a DataFrame or a dataclass out.

The dashboard and `vramscope report` both call these, so that they always agree.
Nothing here prints, plots or reads files.

    timeline        allocated / active / reserved bytes per event, downsampling, step and phase spans, the peak
    live            what is alive at a moment, and breakdowns of it
    modules         per-module forward / backward / retained / peak bytes, and subtree roll-ups
    categories      bytes per category over time and at the peak
    fragmentation   the allocator's address space replayed: free space, splits, largest free block
    compare         run summaries and the differences between runs
"""

from __future__ import annotations

from profiler.analysis.categories import category_at_peak, category_timeline
from profiler.analysis.compare import (compare, compare_categories, compare_many, compare_modules,
                                       summarize)
from profiler.analysis.fragmentation import (allocator_counters, fragmentation, fragmentation_at_peak,
                                             segment_map_at)
from profiler.analysis.live import Lifetimes, alive_at_peak, breakdown, lifetimes, live_at
from profiler.analysis.modules import module_table, rollup
from profiler.analysis.timeline import (Peak, downsample, memory_timeline, peak, phase_spans,
                                        step_spans)

__all__ = [
    "Lifetimes",
    "Peak",
    "alive_at_peak",
    "allocator_counters",
    "breakdown",
    "category_at_peak",
    "category_timeline",
    "compare",
    "compare_categories",
    "compare_many",
    "compare_modules",
    "downsample",
    "fragmentation",
    "fragmentation_at_peak",
    "lifetimes",
    "live_at",
    "memory_timeline",
    "module_table",
    "peak",
    "phase_spans",
    "rollup",
    "segment_map_at",
    "step_spans",
    "summarize",
]
