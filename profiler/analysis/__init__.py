"""Pure functions over a loaded Trace: a Trace in, a DataFrame or a dataclass out.

The dashboard and `vramscope report` both call these, so that they always agree.
Nothing here prints, plots or opens a file: profiler.trace reads a run into a Trace
(reader), finds runs and a multi-rank run's ranks (layout), keeps the summary cache
(summary_cache), and hands analysis what it loaded.

    timeline        allocated / active / reserved bytes per event, step and phase spans, the peak
    columns         what the others share: event kinds, dictionary codes, integer columns, block bytes
    downsample      fewer rows for a plot, keeping each bucket's minimum and maximum
    live            what is alive at a moment, and breakdowns of it
    modules         per-module forward / backward / retained / peak bytes, and subtree roll-ups
    categories      bytes per category over time, at the peak, and each category's own peak
    attribution     bytes at the peak that no module, role or phase explains, and why
    fragmentation   the allocator's address space replayed: free space, splits, largest free block
    slack           cached-but-free, split, largest free block and retries at every step end; which matters
    summary         one run's headline facts (profiler.trace.summary_cache keeps them in summary.json)
    compare         the differences between runs, from their summaries; memory saved and speed change
    stacks          allocation sites as a tree of frames
    kv              a KV cache's bytes against its tokens, and the bytes it holds for none
    ranks           a multi-rank run: per-rank table, skew, timelines and categories, the job as one summary

Allocated bytes drop when a free is requested (free_requested), active bytes when it
completes (free_completed), as in torch's caching allocator; see timeline.py.
Functions that take `lt` accept live.lifetimes(trace) computed once and shared: a page
that calls several of them pays for the pairing of allocs with frees once.
"""

from __future__ import annotations

from profiler.analysis.categories import category_at_peak, category_peaks, category_timeline
from profiler.analysis.compare import (
    Headline,
    ablation_view,
    compare,
    compare_categories,
    compare_many,
    compare_modules,
    compare_summaries,
    differing_columns,
    headline,
    memory_saved_pct,
    speed_change_pct,
    summarize,
    summary_row,
)
from profiler.analysis.downsample import downsample
from profiler.analysis.fragmentation import allocator_counters, fragmentation, fragmentation_at_peak, segment_map_at
from profiler.analysis.kv import kv_table, kv_token_bytes, kv_waste
from profiler.analysis.live import Lifetimes, alive_at_peak, breakdown, lifetimes, live_at
from profiler.analysis.modules import module_table, rollup
from profiler.analysis.slack import collapse_segments, segment_slack, slack_by_step, slack_verdict
from profiler.analysis.stacks import stack_tree
from profiler.analysis.summary import run_summary
from profiler.analysis.timeline import (
    Peak,
    active_bytes,
    allocated_bytes,
    memory_timeline,
    peak,
    phase_spans,
    step_spans,
)

__all__ = [
    "Headline",
    "Lifetimes",
    "Peak",
    "ablation_view",
    "active_bytes",
    "alive_at_peak",
    "allocated_bytes",
    "allocator_counters",
    "breakdown",
    "category_at_peak",
    "category_peaks",
    "category_timeline",
    "collapse_segments",
    "compare",
    "compare_categories",
    "compare_many",
    "compare_modules",
    "compare_summaries",
    "differing_columns",
    "downsample",
    "fragmentation",
    "fragmentation_at_peak",
    "headline",
    "kv_table",
    "kv_token_bytes",
    "kv_waste",
    "lifetimes",
    "live_at",
    "memory_saved_pct",
    "memory_timeline",
    "module_table",
    "peak",
    "phase_spans",
    "rollup",
    "run_summary",
    "segment_map_at",
    "segment_slack",
    "slack_by_step",
    "slack_verdict",
    "speed_change_pct",
    "stack_tree",
    "step_spans",
    "summarize",
    "summary_row",
]
