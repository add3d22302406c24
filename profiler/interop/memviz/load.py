"""Reading a snapshot pickle without running code, checking its shape within bounds, and picking a device.

A pickle is input we do not control. Besides code (refused: no global is ever looked up), it
can hold values that are small on disk and endless when expanded: a list that holds another
list twice, forty levels deep, is 731 bytes and 2^40 elements as a repr; one segment or frame
list referenced two million times is two million times its size when walked naively. So:
- only a regular file is read, streamed from disk (never held whole beside its objects);
- the check walks the snapshot's structure as the import will and counts what it walks
  (entries, segments, blocks) against caps; a segment shared many times is checked once
  and counted every time, so everything after the check is bounded by those counts;
- every integer that becomes a column is range-checked (addresses and sizes in 0..2^63);
- an error quotes a value only through `show`, which is depth- and length-limited.
"""

from __future__ import annotations

import os
import pickle
import reprlib
import stat
from collections.abc import Callable
from pathlib import Path

from profiler.errors import TraceError, UsageError
from profiler.interop.memviz.entries import Entries
from profiler.trace import schema

_BLOCK_STATES = {s.value for s in schema.BlockState}

# Far above what a real snapshot holds (torch's default ring keeps 100,000 entries), low enough
# that every later pass over them finishes.
MAX_PICKLE_BYTES = 64 << 30
MAX_ENTRIES = 50_000_000  # trace entries, all devices together
MAX_SEGMENTS = 1_000_000
MAX_BLOCKS = 20_000_000
MAX_DEVICES = 1024
INT64_END = 1 << 63  # addresses, sizes and times must lie in [0, INT64_END)


class _ShortRepr(reprlib.Repr):
    def repr_int(self, x, level):
        # repr() of an int of thousands of digits raises (and is slow before that).
        return repr(x) if x.bit_length() <= 256 else f"<an integer of {x.bit_length():,} bits>"


_SHOW = _ShortRepr()
_SHOW.maxlevel, _SHOW.maxdict, _SHOW.maxlist, _SHOW.maxtuple = 2, 4, 4, 4
_SHOW.maxstring, _SHOW.maxother, _SHOW.maxlong = 40, 40, 40


def show(v) -> str:
    """A short rendering of any value: reprlib stops at two levels and four items, so a value
    shared or nested without end costs a few hundred steps here, never a whole repr."""
    text = _SHOW.repr(v)
    return text if len(text) <= 100 else text[:97] + "..."


class _PlainUnpickler(pickle.Unpickler):
    """A snapshot is dicts, lists, strings and numbers: refuse every global (no code runs)."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"it references {show(module)}.{show(name)}, which a memory snapshot never does")


class _CountingReader:
    """A binary file that reports how many bytes the unpickler has read (for a progress bar)."""

    def __init__(self, f, on_read: Callable[[int], None]):
        self._f, self._on_read, self.done = f, on_read, 0

    def _count(self, n: int) -> None:
        self.done += n
        self._on_read(self.done)

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        self._count(len(data))
        return data

    def readinto(self, buf) -> int:
        n = self._f.readinto(buf)
        self._count(n or 0)
        return n

    def readline(self, limit: int = -1) -> bytes:
        data = self._f.readline(limit)
        self._count(len(data))
        return data

    def peek(self, n: int = 0) -> bytes:
        return self._f.peek(n)


def pickle_size(path) -> int:
    """The size of a snapshot file, which must be a regular file of a sane size (a FIFO or a
    device would block or never end)."""
    path = Path(path)
    try:
        st = os.stat(path)
    except OSError as exc:
        raise TraceError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if not stat.S_ISREG(st.st_mode):
        raise TraceError(f"{path}: not a regular file (a snapshot is a pickle file)")
    if st.st_size > MAX_PICKLE_BYTES:
        raise TraceError(f"{path}: {st.st_size:,} bytes is more than a snapshot holds (at most {MAX_PICKLE_BYTES:,})")
    return st.st_size


def load_snapshot(path, on_read: Callable[[int], None] | None = None) -> dict:
    """The snapshot dict of a pickle, or a one-line TraceError saying why it is not one.
    `on_read(bytes_read)` is called as the file is read."""
    path = Path(path)
    pickle_size(path)
    try:
        with open(path, "rb") as f:
            source = _CountingReader(f, on_read) if on_read else f
            snap = _PlainUnpickler(source).load()
    except OSError as exc:
        raise TraceError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except RecursionError:
        raise TraceError(f"{path}: not a torch memory snapshot (nested too deeply)") from None
    except MemoryError:
        raise TraceError(f"{path}: not a torch memory snapshot (it does not fit in memory)") from None
    except Exception as exc:  # noqa: BLE001 - corrupt pickles raise almost any type
        raise TraceError(
            f"{path}: not a torch memory snapshot (unreadable pickle: {type(exc).__name__}: {show(str(exc))})"
        ) from None
    check_snapshot(snap, path)
    return snap


def check_snapshot(snap, where="snapshot", frames_type: type = list) -> None:
    """Raise a one-line TraceError unless `snap` is a snapshot whose every field the import
    reads has the right type and range, and whose entries, segments and blocks are within caps.
    `frames_type` is what a frames value is: a list, or (streaming reader) a stack handle; a
    device trace the streaming reader read is columns it has checked as _entry_problem does."""
    if not isinstance(snap, dict):
        raise TraceError(f"{where}: not a torch memory snapshot (a pickled {type(snap).__name__}, not a dict)")
    if "segments" not in snap and "device_traces" not in snap:
        keys = ", ".join(show(k) for k, _ in zip(snap, range(6))) or "none"
        raise TraceError(f"{where}: not a torch memory snapshot (no segments or device_traces; keys: {keys})")
    segs, traces = snap.get("segments", []), snap.get("device_traces", [])
    if not isinstance(segs, list) or not isinstance(traces, list):
        raise TraceError(f"{where}: not a torch memory snapshot (segments and device_traces must be lists)")
    _check_segments(segs, where, frames_type)
    _check_traces(traces, where)


def _check_segments(segs: list, where, frames_type: type) -> None:
    if len(segs) > MAX_SEGMENTS:
        raise TraceError(f"{where}: {len(segs):,} segments is more than a snapshot holds (at most {MAX_SEGMENTS:,})")
    checked: set[int] = set()  # ids of segments already checked: the list keeps them alive
    blocks = 0
    for seg in segs:
        blocks += len(seg.get("blocks", ())) if isinstance(seg, dict) and isinstance(seg.get("blocks"), list) else 0
        if blocks > MAX_BLOCKS:
            raise TraceError(f"{where}: more than {MAX_BLOCKS:,} blocks in the snapshot's segments")
        if id(seg) in checked:
            continue
        checked.add(id(seg))
        problem = _segment_problem(seg)
        if problem:
            raise TraceError(f"{where}: malformed segment in snapshot ({problem}): {show(seg)}")
        for b in seg.get("blocks", []):
            problem = _block_problem(b, frames_type)
            if problem:
                raise TraceError(f"{where}: malformed block in snapshot ({problem}): {show(b)}")


def _check_traces(traces: list, where) -> None:
    if len(traces) > MAX_DEVICES:
        raise TraceError(f"{where}: {len(traces):,} device traces (at most {MAX_DEVICES})")
    entries = 0
    for dev in traces:
        if not isinstance(dev, (list, Entries)):
            raise TraceError(f"{where}: malformed device trace (a {type(dev).__name__}, not a list)")
        entries += len(dev)
        if entries > MAX_ENTRIES:
            raise TraceError(f"{where}: more than {MAX_ENTRIES:,} trace entries in the snapshot")
    for dev in traces:
        if isinstance(dev, Entries):
            continue  # columns of the streaming reader
        for e in dev:
            problem = _entry_problem(e)
            if problem:
                raise TraceError(f"{where}: malformed trace entry in snapshot ({problem}): {show(e)}")


def _segment_problem(seg) -> str | None:
    if not isinstance(seg, dict):
        return "not a dict"
    return (
        _int_problem(seg, "address", required=True)
        or _int_problem(seg, "total_size", required=True)
        or _int_problem(seg, "stream", low=-INT64_END)
        or _int_problem(seg, "device", end=1 << 31)
        or _type_problem(seg, "blocks", list)
        or _type_problem(seg, "segment_type", str)
        or _type_problem(seg, "is_expandable", bool)
    )


def _block_problem(b, frames_type: type) -> str | None:
    if not isinstance(b, dict):
        return "not a dict"
    if b.get("state") not in _BLOCK_STATES:
        return "unknown state"
    return (
        _int_problem(b, "size", required=True)
        or _int_problem(b, "address")
        or _int_problem(b, "requested_size")
        or _type_problem(b, "frames", frames_type)
    )


def _entry_problem(e) -> str | None:
    if not isinstance(e, dict):
        return "not a dict"
    if not isinstance(e.get("action"), str):
        return "action is not a string"
    return (
        _int_problem(e, "addr")
        or _int_problem(e, "size")
        or _int_problem(e, "time_us")
        or _int_problem(e, "stream", low=-INT64_END)
        or _type_problem(e, "frames", list)
    )


def _int_problem(d: dict, key: str, required: bool = False, low: int = 0, end: int = INT64_END) -> str | None:
    v = d.get(key)
    if v is None:
        return f"no {key}" if required else None
    if not is_int(v):
        return f"{key} is not an integer"
    if not low <= v < end:
        return f"{key} {v} is outside {low}..{end - 1}" if v.bit_length() < 200 else f"{key} is out of range"
    return None


def _type_problem(d: dict, key: str, kind: type) -> str | None:
    v = d.get(key)
    return None if v is None or isinstance(v, kind) else f"{key} is not a {kind.__name__}"


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def plain_settings(settings) -> dict:
    """The allocator settings, keeping only values of the shapes torch writes (flags, numbers,
    short strings, and short lists or maps of numbers): they go into meta.json whole."""
    if not isinstance(settings, dict):
        return {}
    out = {}
    for k, v in list(settings.items())[:64]:
        if not isinstance(k, str) or len(k) > 100:
            continue
        if isinstance(v, (bool, float)) or (is_int(v) and -INT64_END <= v < INT64_END):
            out[k] = v
        elif isinstance(v, str) and len(v) <= 200:
            out[k] = v
        elif isinstance(v, list) and len(v) <= 64 and all(_small_int(x) for x in v):
            out[k] = list(v)
        elif isinstance(v, dict) and len(v) <= 64 and all(_small_key(x) and _small_int(y) for x, y in v.items()):
            out[k] = {str(x): y for x, y in v.items()}
    return out


def _small_int(v) -> bool:
    return is_int(v) and 0 <= v < 1 << 31


def _small_key(k) -> bool:
    return (is_int(k) and 0 <= k < 1 << 63) or (isinstance(k, str) and k.isdigit() and len(k) <= 19)


def snapshot_devices(snap: dict) -> dict[int, dict]:
    """Per device: trace entries and segments."""
    out: dict[int, dict] = {}
    for i, trace in enumerate(snap.get("device_traces", [])):
        out.setdefault(i, {"entries": 0, "segments": 0})["entries"] = len(trace)
    for seg in snap.get("segments", []):
        d = seg.get("device", 0)
        d = d if is_int(d) else 0
        out.setdefault(d, {"entries": 0, "segments": 0})["segments"] += 1
    return out


def pick_device(snap: dict, device: int | None) -> int:
    devices = snapshot_devices(snap)
    if device is not None:
        if device not in devices:
            have = ", ".join(map(str, sorted(devices))) or "none"
            raise UsageError(f"device {device} is not in the snapshot (devices: {have})")
        return device
    if not devices:
        return 0
    # Most trace entries, then most segments, then the lowest index.
    return max(sorted(devices), key=lambda d: (devices[d]["entries"], devices[d]["segments"]))
