"""Reading a snapshot pickle for the import: streamed where possible, else unpickled.

The streaming reader (pickle_scan.cpp) runs the pickle's opcodes without building its
objects: trace entries become columns and tracebacks stack handles as they are read, so
memory stays near the pickle's size (the standard unpickler's object graph is several times
it: each traceback a list of frame references). It takes what a torch snapshot is made of,
and stops at anything else (an opcode that names a global or calls, a field the import
refuses, a shape it does not know); the file is then read by load.load_snapshot, whose checks
and one-line errors are the reference, so a refused or malformed pickle fails exactly as
before. Either way the result is the snapshot dict with each device trace as `Entries`,
and the stack interner for its tables.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from profiler.errors import TraceError
from profiler.interop.memviz import native
from profiler.interop.memviz.entries import Entries, tag_of
from profiler.interop.memviz.load import MAX_ENTRIES, check_snapshot, load_snapshot
from profiler.interop.memviz.stacks import Interner, StreamStacks

# Set to "0" to read every snapshot with the standard unpickler.
STREAM_ENV = "VRAMSCOPE_STREAM_IMPORT"


@dataclass
class Read:
    snap: dict  # device_traces: one Entries per device
    stacks: Interner | StreamStacks
    reader: str  # "streaming", or "unpickler" and why not streaming


def read_snapshot(path, on_read: Callable[[int], None] | None = None) -> Read:
    """The snapshot at `path` (whose size load.pickle_size has checked), or a one-line TraceError."""
    why = "turned off" if os.environ.get(STREAM_ENV) == "0" else None
    if why is None:
        streamed = _stream(path, on_read)
        if isinstance(streamed, Read):
            return streamed
        why = streamed
    snap = load_snapshot(path, on_read)
    snap["device_traces"] = [Entries.from_dicts(dev) for dev in snap.get("device_traces", [])]
    return Read(snap, Interner(), f"unpickler ({why})")


def _stream(path, on_read) -> Read | str:
    """The snapshot read by the streaming reader, or why it did not read it."""
    module, why = native.load()
    if module is None:
        return f"no streaming reader: {why}"
    scan = module.Scan()  # type: ignore[attr-defined]
    why = scan.run(str(path), on_read, MAX_ENTRIES)
    if why or scan.top_dict_check():
        return why or "not a dict"
    try:
        snap = scan.convert_top()
        if "device_traces" in snap:
            columns = {c: scan.column(c) for c in ("action", "addr", "size", "stream", "time_us", "frames", "meta")}
            snap["device_traces"] = [_entries(scan, columns, rows) for rows in scan.device_rows()]
        stacks = StreamStacks(scan, scan.frame_dicts())
        check_snapshot(snap, path, frames_type=int)
    except (ValueError, TypeError, UnicodeError, TraceError) as exc:
        # The standard reader says what is wrong, in its own words.
        return f"{type(exc).__name__}: {exc}"
    return Read(snap, stacks, "streaming")


def _entries(scan, columns: dict, rows: np.ndarray) -> Entries:
    def strings(indices: np.ndarray, make) -> list:
        distinct, inverse = np.unique(indices, return_inverse=True)
        made = np.array([make(scan.string(i) if i >= 0 else None) for i in distinct], dtype=object)
        return made[inverse].tolist() if len(indices) else []

    return Entries(
        action=strings(columns["action"][rows], str),
        addr=columns["addr"][rows],
        size=columns["size"][rows],
        stream=columns["stream"][rows],
        time_us=columns["time_us"][rows],
        frames=columns["frames"][rows],
        tags=strings(columns["meta"][rows], tag_of),
    )
