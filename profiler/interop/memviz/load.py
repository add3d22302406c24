"""Reading a snapshot pickle without running code, checking its shape, and picking a device."""

from __future__ import annotations

import io
import pickle
from pathlib import Path

from profiler.errors import TraceError, UsageError
from profiler.trace import schema

_BLOCK_STATES = {s.value for s in schema.BlockState}


class _PlainUnpickler(pickle.Unpickler):
    """A snapshot is dicts, lists, strings and numbers: refuse every global (no code runs)."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"it references {module}.{name}, which a memory snapshot never does")


def load_snapshot(path) -> dict:
    """The snapshot dict of a pickle, or a one-line TraceError saying why it is not one."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise TraceError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        snap = _PlainUnpickler(io.BytesIO(data)).load()
    except RecursionError:
        raise TraceError(f"{path}: not a torch memory snapshot (nested too deeply)") from None
    except Exception as exc:  # noqa: BLE001 - corrupt pickles raise almost any type
        raise TraceError(
            f"{path}: not a torch memory snapshot (unreadable pickle: {type(exc).__name__}: {exc})"
        ) from None
    check_snapshot(snap, path)
    return snap


def check_snapshot(snap, where="snapshot") -> None:
    if not isinstance(snap, dict):
        raise TraceError(f"{where}: not a torch memory snapshot (a pickled {type(snap).__name__}, not a dict)")
    if "segments" not in snap and "device_traces" not in snap:
        keys = ", ".join(sorted(map(str, snap))[:6]) or "none"
        raise TraceError(f"{where}: not a torch memory snapshot (no segments or device_traces; keys: {keys})")
    segs, traces = snap.get("segments", []), snap.get("device_traces", [])
    if not isinstance(segs, list) or not isinstance(traces, list):
        raise TraceError(f"{where}: not a torch memory snapshot (segments and device_traces must be lists)")
    for seg in segs:
        if (
            not isinstance(seg, dict)
            or not is_int(seg.get("address"))
            or not is_int(seg.get("total_size"))
            or not isinstance(seg.get("blocks", []), list)
        ):
            raise TraceError(f"{where}: malformed segment in snapshot: {_show(seg)}")
        for b in seg.get("blocks", []):
            if not isinstance(b, dict) or not is_int(b.get("size")) or b.get("state") not in _BLOCK_STATES:
                raise TraceError(f"{where}: malformed block in snapshot: {_show(b)}")
    for dev in traces:
        if not isinstance(dev, list):
            raise TraceError(f"{where}: malformed device trace (not a list)")
        for e in dev:
            if (
                not isinstance(e, dict)
                or not isinstance(e.get("action"), str)
                or not all(is_int(e.get(k) or 0) for k in ("addr", "size", "stream", "time_us"))
            ):
                raise TraceError(f"{where}: malformed trace entry in snapshot: {_show(e)}")


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _show(v) -> str:
    text = repr(v)
    return text if len(text) <= 80 else text[:77] + "..."


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
