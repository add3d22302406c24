"""The trace stage: the format, writing it during capture, finalizing it, reading it back.

    schema         every table, column and meta.json key, defined once
    tags           the allocation tag the capture stamps ("phase|module|category")
    journal        the Arrow IPC journals a capture appends to, and reading back their whole batches
    writer         TraceWriter: journals while capturing, meta.json, finalize() publishes Parquet
    finalize/      journals -> published tables (block sizes, templates, markers, categories)
    files          atomic writes: a temporary beside the file, then a rename
    problems       what is wrong with a run on disk, as one TraceError line
    reader         load_trace(): checks a run and returns a Trace
    layout         finding runs, a multi-rank run's rank=N partitions, reading meta.json
    summary_cache  summary.json: a run's summary, cached beside it
    model          the Trace: tables as DataFrames plus meta

The capture imports only the light modules here (schema, tags, journal, writer); nothing
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
