"""vramscope: GPU memory profiling for PyTorch LLM work.

Capture:   profiler.profile(...), profiler.mark(...), profiler.category(...),
           profiler.record_kv(cache), profiler.step()
Read:      profiler.load_trace(path)
Analyse:   profiler.analysis
"""

from __future__ import annotations

import os

from profiler.capture.import_hooks import INDUCTOR_GRAPH, when_imported
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


def _record_lowerings(graph_module) -> None:  # inductor is being imported: torch is loaded
    from profiler.capture.compiled import patch_lowering

    patch_lowering(graph_module)


# Graphs that inductor compiles from now on get line maps: a model compiled before a
# capture begins keeps its layer names in it (profiler/capture/compiled.py).
# VRAMSCOPE_COMPILE_MAPS=0 leaves it to the captures (graphs compiled inside them only).
if os.environ.get("VRAMSCOPE_COMPILE_MAPS", "1") != "0":
    when_imported(INDUCTOR_GRAPH, _record_lowerings)


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
