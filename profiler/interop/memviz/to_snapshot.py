"""A torch memory snapshot from a vramscope trace.

Events become a device trace, the run's `end` segment map (or `start` when there
is none) becomes `segments`, and the allocator settings come from meta.json. The
result is what https://pytorch.org/memory_viz and torch.cuda._memory_viz read:
plain dicts, lists, strings and ints, pickled with protocol 4.
"""

from __future__ import annotations

import pickle
from pathlib import Path

from profiler.errors import UsageError
from profiler.trace import schema
from profiler.trace.files import atomic_path
from profiler.trace.tags import make_tag

PICKLE_PROTOCOL = 4
_INACTIVE = schema.BlockState.INACTIVE.value
_ALLOCATED = schema.BlockState.ACTIVE_ALLOCATED.value


def _frames_by_stack(trace) -> dict[int, list[dict]]:
    fr = trace.frames
    by_id = {
        int(i): {"filename": str(f), "line": int(line), "name": str(n)}
        for i, f, line, n in zip(fr["frame_id"], fr["filename"], fr["line"], fr["function"])
    }
    return {
        int(s): [dict(by_id[int(i)]) for i in ids if int(i) in by_id]
        for s, ids in zip(trace.stacks["stack_id"], trace.stacks["frame_ids"])
    }


def _opt_int(v):
    try:
        if v is None or v != v:  # None or NaN
            return None
    except (TypeError, ValueError):
        return None
    return int(v)


def _opt_str(v):
    if v is None or (isinstance(v, float) and v != v):
        return None
    return str(v)


def snapshot_of(trace) -> dict:
    """A torch memory snapshot dict of a loaded vramscope Trace."""
    stacks = _frames_by_stack(trace)
    ev = trace.events
    oom = trace.meta.get("oom") or {}
    entries = []
    cols = [
        ev[c].tolist()
        for c in ("action", "addr", "size_bytes", "stream", "ts_us", "stack_id", "phase", "module", "category")
    ]
    for action, addr, size, stream, ts, sid, phase, module, cat in zip(*cols):
        sid = _opt_int(sid)
        tag = make_tag(_opt_str(phase), _opt_str(module), _opt_str(cat))
        e = {
            "action": str(action),
            "addr": _opt_int(addr) or 0,
            "size": _opt_int(size) or 0,
            "stream": _opt_int(stream) or 0,
            "time_us": _opt_int(ts) or 0,
            "compile_context": "N/A",
            "user_metadata": "" if tag == make_tag(None, None, None) else tag,
            "frames": [dict(f) for f in stacks.get(sid, [])] if sid is not None else [],
        }
        if e["action"] == "oom":
            e["device_free"] = int(oom.get("device_free_bytes") or 0)
        entries.append(e)
    return {
        "segments": _segments_of(trace, stacks),
        "device_traces": [entries],
        "allocator_settings": dict(trace.meta.get("allocator_settings") or {}),
        "external_annotations": [],
    }


_SEGMENT_COLUMNS = (
    "segment_addr",
    "segment_bytes",
    "stream",
    "segment_type",
    "is_expandable",
    "block_addr",
    "block_bytes",
    "requested_bytes",
    "state",
    "stack_id",
)


def _segments_of(trace, stacks) -> list[dict]:
    seg = _snapshot_rows(trace.segments)
    if seg is None:
        return []
    out: dict[int, dict] = {}
    rows = zip(*(seg[c].tolist() for c in _SEGMENT_COLUMNS))
    for s_addr, s_bytes, stream, s_type, expandable, b_addr, b_bytes, req, state, sid in rows:
        s_addr = _opt_int(s_addr)
        if s_addr is None:
            continue
        s = out.get(s_addr)
        if s is None:
            s = out[s_addr] = _segment(s_addr, s_bytes, stream, s_type, expandable)
        _add_block(s, stacks, b_addr, b_bytes, req, state, sid)
    for s in out.values():
        s["blocks"].sort(key=lambda b: b["address"])
    return [out[a] for a in sorted(out)]


def _snapshot_rows(seg):
    """The rows of the `end` segment map, else of the `start` one, else None."""
    if seg.empty:
        return None
    kinds = set(seg["snapshot"].astype(str))
    kind = "end" if "end" in kinds else "start" if "start" in kinds else None
    if kind is None:
        return None
    return seg[seg["snapshot"].astype(str) == kind]


def _segment(s_addr: int, s_bytes, stream, s_type, expandable) -> dict:
    """A snapshot segment with no blocks yet."""
    return {
        "device": 0,
        "address": s_addr,
        "total_size": _opt_int(s_bytes) or 0,
        "allocated_size": 0,
        "active_size": 0,
        "requested_size": 0,
        "stream": _opt_int(stream) or 0,
        "segment_type": _opt_str(s_type) or "large",
        "segment_pool_id": (0, 0),
        "is_expandable": bool(expandable) if expandable == expandable and expandable is not None else False,
        "frames": [],
        "blocks": [],
    }


def _add_block(s: dict, stacks, b_addr, b_bytes, req, state, sid) -> None:
    """Append a block to segment `s` and count it in the segment's allocated, active and requested sizes."""
    size = _opt_int(b_bytes) or 0
    state = _opt_str(state) or _INACTIVE
    requested = _opt_int(req)
    requested = size if requested is None and state != _INACTIVE else requested or 0
    sid = _opt_int(sid)
    s["blocks"].append(
        {
            "address": _opt_int(b_addr) or s["address"],
            "size": size,
            "requested_size": requested,
            "state": state,
            "frames": [dict(f) for f in stacks.get(sid, [])] if sid is not None else [],
        }
    )
    if state == _ALLOCATED:
        s["allocated_size"] += size
    if state != _INACTIVE:
        s["active_size"] += size
        s["requested_size"] += requested


def export_memory_viz(run, out_path) -> dict:
    """Write the run as a snapshot pickle; returns the snapshot written."""
    from profiler.trace.reader import load_trace  # pandas only for the verbs that read traces

    trace = load_trace(run, tables=("events", "segments", "frames", "stacks"))
    snap = snapshot_of(trace)
    out_path = Path(out_path)
    try:
        with atomic_path(out_path) as tmp, open(tmp, "wb") as f:
            pickle.dump(snap, f, protocol=PICKLE_PROTOCOL)
    except OSError as exc:
        raise UsageError(f"{out_path}: cannot write: {exc.strerror or exc}") from None
    return snap
