"""The trace stage: the format, writing it during capture, finalizing it, reading it back.

    schema      every table, column and enumerated value, defined once
    tags        the allocation tag the capture stamps ("phase|module|category")
    writer      per-table Arrow journals while capturing; finalize() publishes Parquet
    finalize/   journals -> published tables (block sizes, templates, markers, categories)
    reader      load_trace(): checks a run and returns a Trace
    model       the Trace: tables as DataFrames plus meta

The capture imports only the light modules here (schema, tags, writer); nothing
in this package imports pandas until a trace is read.
"""

from __future__ import annotations

__all__ = ["Trace", "load_trace"]


def __getattr__(name):
    # Lazy: the capture imports profiler.trace.writer, and must not pay for pandas.
    if name == "Trace":
        from profiler.trace.model import Trace

        return Trace
    if name == "load_trace":
        from profiler.trace.reader import load_trace

        return load_trace
    raise AttributeError(name)
