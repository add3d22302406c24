"""Plotly figure builders: DataFrames in (as profiler.analysis returns them), a go.Figure out.

Nothing here reads a trace or touches Streamlit, so that every chart is tested on its own.
Bytes stay bytes in the data; the axes show them in binary units (GiB) only for reading.
Long lines are drawn with Scattergl (WebGL); the caller downsamples them first.
One module per dashboard page and base.py for what they share; the pages import the names from here.
"""

from dashboard.figures.base import GIB
from dashboard.figures.categories import category_area, category_peak_bar
from dashboard.figures.compare import diff_bar, overlay_timelines
from dashboard.figures.fragmentation import STATE_COLORS, segment_map, slack_panels
from dashboard.figures.kv import kv_growth, kv_waste
from dashboard.figures.layers import module_bar, module_tree
from dashboard.figures.overview import MAX_SPANS, SERIES, allocator_counters, breakdown_bar, memory_timeline
from dashboard.figures.ranks import rank_categories, rank_peaks, rank_timelines
from dashboard.figures.stacks import measured_vs_predicted, stack_icicle

__all__ = [
    "GIB",
    "MAX_SPANS",
    "SERIES",
    "STATE_COLORS",
    "allocator_counters",
    "breakdown_bar",
    "category_area",
    "category_peak_bar",
    "diff_bar",
    "kv_growth",
    "kv_waste",
    "measured_vs_predicted",
    "memory_timeline",
    "module_bar",
    "module_tree",
    "overlay_timelines",
    "rank_categories",
    "rank_peaks",
    "rank_timelines",
    "segment_map",
    "slack_panels",
    "stack_icicle",
]
