"""vramscope: GPU memory profiling for PyTorch LLM work.

Capture:   profiler.profile(...), profiler.mark(...), profiler.category(...),
           profiler.record_kv(cache), profiler.step()
Read:      profiler.load_trace(path)
Analyse:   profiler.analysis
"""

from __future__ import annotations

from profiler.errors import TraceError, UsageError, VramscopeError
from profiler.trace.schema import SCHEMA_VERSION, Action, Category, Phase

__all__ = [
    "SCHEMA_VERSION",
    "Action",
    "Category",
    "Phase",
    "TraceError",
    "UsageError",
    "VramscopeError",
    "category",
    "load_trace",
    "mark",
    "profile",
    "record_kv",
    "register_model",
    "step",
]


def __getattr__(name):
    # Lazy, so that `import profiler` stays cheap and the reader's pandas import
    # never lands in a process that only captures.
    if name in ("profile", "mark", "step", "record_kv", "register_model", "category"):
        from profiler.capture import session

        return getattr(session, name)
    if name == "load_trace":
        from profiler.trace.reader import load_trace

        return load_trace
    raise AttributeError(name)
