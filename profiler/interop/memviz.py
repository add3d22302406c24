"""To and from torch's memory snapshot: the pickle of `torch.cuda.memory._dump_snapshot`.

Import. A snapshot holds the segment map at dump time (`segments`) and the
allocator's history before it (`device_traces`, a ring buffer that may have
wrapped, so that it starts mid-run). A vramscope trace wants the segment map
at the *start* of its events, so the start map is rebuilt by rewinding: begin
from the dump-time map and undo the trace entries newest first (an alloc makes
its block free again, a free_completed makes it pending, a free_requested
allocated, a segment_alloc removes the segment, a segment_free restores it).
Blocks freed in the trace but allocated before it began thereby become part
of the start state, which is what a wrapped ring needs.

What the rewind cannot know, it estimates, and counts in meta.json:
- the block size of an allocation freed in the trace and still unfreed at its
  start: the request rounded as the allocator rounds it, widened to the whole
  free gap when the allocator would not have split that gap;
- a block freed in the trace that lies in no known segment is kept outside any
  segment (it counts in baseline_allocated_bytes, not in the segments table).
A snapshot has no allocator counters, so max_allocated_bytes is the peak of a
replay of block sizes from the rebuilt start (meta `max_allocated_source: replay`).
Phases are unknown: module and category come from `user_metadata` alone (a
vramscope tag "phase|module|category" is taken whole; any other string is
taken as the module).

Export. The other way round: events become a device trace, the run's `end`
segment map (or `start` when there is none) becomes `segments`, and the
allocator settings come from meta.json. The result is what
https://pytorch.org/memory_viz and torch.cuda._memory_viz read: plain dicts,
lists, strings and ints, pickled with protocol 4.
"""

from __future__ import annotations

import io
import pickle
from dataclasses import dataclass, field
from pathlib import Path

from profiler.errors import TraceError, UsageError
from profiler.trace import schema
from profiler.trace.files import atomic_path
from profiler.trace.finalize import markers
from profiler.trace.finalize.blocks import SMALL_BUFFER, AllocatorRules, BlockReplay, block_sizes
from profiler.trace.tags import TAG_SEP, make_tag, parse_tag

PICKLE_PROTOCOL = 4
_INACTIVE = schema.BlockState.INACTIVE.value
_ALLOCATED = schema.BlockState.ACTIVE_ALLOCATED.value
_PENDING = schema.BlockState.ACTIVE_PENDING_FREE.value
_BLOCK_STATES = {s.value for s in schema.BlockState}


# -- reading a snapshot ---------------------------------------------------------------
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
        raise TraceError(f"{path}: not a torch memory snapshot (unreadable pickle: "
                         f"{type(exc).__name__}: {exc})") from None
    check_snapshot(snap, path)
    return snap


def check_snapshot(snap, where="snapshot") -> None:
    if not isinstance(snap, dict):
        raise TraceError(f"{where}: not a torch memory snapshot (a pickled {type(snap).__name__}, "
                         f"not a dict)")
    if "segments" not in snap and "device_traces" not in snap:
        keys = ", ".join(sorted(map(str, snap))[:6]) or "none"
        raise TraceError(f"{where}: not a torch memory snapshot (no segments or device_traces; "
                         f"keys: {keys})")
    segs, traces = snap.get("segments", []), snap.get("device_traces", [])
    if not isinstance(segs, list) or not isinstance(traces, list):
        raise TraceError(f"{where}: not a torch memory snapshot (segments and device_traces must "
                         f"be lists)")
    for seg in segs:
        if not isinstance(seg, dict) or not _is_int(seg.get("address")) \
                or not _is_int(seg.get("total_size")) or not isinstance(seg.get("blocks", []), list):
            raise TraceError(f"{where}: malformed segment in snapshot: {_show(seg)}")
        for b in seg.get("blocks", []):
            if not isinstance(b, dict) or not _is_int(b.get("size")) \
                    or b.get("state") not in _BLOCK_STATES:
                raise TraceError(f"{where}: malformed block in snapshot: {_show(b)}")
    for dev in traces:
        if not isinstance(dev, list):
            raise TraceError(f"{where}: malformed device trace (not a list)")
        for e in dev:
            if not isinstance(e, dict) or not isinstance(e.get("action"), str) \
                    or not all(_is_int(e.get(k) or 0) for k in ("addr", "size", "stream", "time_us")):
                raise TraceError(f"{where}: malformed trace entry in snapshot: {_show(e)}")


def _is_int(v) -> bool:
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
        d = d if _is_int(d) else 0
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


# -- the rewind -----------------------------------------------------------------------
@dataclass
class _Seg:
    addr: int
    size: int
    stream: int = 0
    segment_type: str = "large"
    is_expandable: bool = False


@dataclass
class _Blk:
    addr: int
    size: int
    requested: int
    state: str
    frames: list | None = None


@dataclass
class Rewind:
    """The allocator state at some point, with the means to step it back."""

    rules: AllocatorRules = field(default_factory=AllocatorRules)
    segments: dict[int, _Seg] = field(default_factory=dict)
    blocks: dict[int, _Blk] = field(default_factory=dict)  # live (not inactive) blocks
    misses: int = 0  # entries that did not fit the state
    estimated: int = 0  # block sizes estimated from a request

    @classmethod
    def from_segments(cls, segments: list[dict], rules: AllocatorRules) -> "Rewind":
        r = cls(rules=rules)
        for seg in segments:
            s = _Seg(seg["address"], seg["total_size"], int(seg.get("stream", 0) or 0),
                     seg.get("segment_type") or ("small" if seg["total_size"] == SMALL_BUFFER
                                                 else "large"),
                     bool(seg.get("is_expandable", False)))
            r.segments[s.addr] = s
            addr = s.addr
            for b in seg.get("blocks", []):
                baddr = b.get("address", addr)
                if b["state"] != _INACTIVE:
                    r.blocks[baddr] = _Blk(baddr, b["size"], b.get("requested_size", b["size"]),
                                           b["state"], b.get("frames"))
                addr = baddr + b["size"]
        return r

    def segment_of(self, addr: int) -> _Seg | None:
        for s in self.segments.values():
            if s.addr <= addr < s.addr + s.size:
                return s
        return None

    def undo(self, e: dict) -> None:
        action, addr, size = e["action"], e.get("addr", 0), e.get("size", 0)
        if action == "alloc":
            b = self.blocks.pop(addr, None)
            if b is None or b.state != _ALLOCATED:
                self.misses += 1
        elif action == "free_requested":
            b = self.blocks.get(addr)
            if b is not None and b.state == _PENDING:
                b.state = _ALLOCATED
            elif b is None:
                self.misses += 1
                self._restore(addr, size, _ALLOCATED, e.get("frames"))
            else:
                self.misses += 1
        elif action == "free_completed":
            if addr in self.blocks:
                self.misses += 1
                return
            self._restore(addr, size, _PENDING, e.get("frames"))
        elif action == "segment_alloc":
            s = self.segments.pop(addr, None)
            if s is None or any(s.addr <= b < s.addr + s.size for b in self.blocks):
                self.misses += 1
        elif action == "segment_free":
            if addr in self.segments:
                self.misses += 1
                return
            self.segments[addr] = _Seg(addr, size, int(e.get("stream", 0) or 0),
                                       "small" if size == SMALL_BUFFER else "large")
        elif action == "segment_map":
            for s in self.segments.values():
                if s.addr + s.size == addr + size and s.size >= size:
                    s.size -= size
                    if not s.size:
                        del self.segments[s.addr]
                    return
            self.misses += 1
        elif action == "segment_unmap":
            for s in self.segments.values():
                if s.addr + s.size == addr:
                    s.size += size
                    return
            self.segments[addr] = _Seg(addr, size, int(e.get("stream", 0) or 0), "large", True)

    def _restore(self, addr: int, requested: int, state: str, frames) -> None:
        """Bring back a block freed later: its size is estimated from the request."""
        size = self.rules.round_size(requested)
        seg = self.segment_of(addr)
        if seg is not None:
            # The free gap the block lies in, up to the next live block or the segment's end.
            nxt = min((b for b in self.blocks if addr < b < seg.addr + seg.size),
                      default=seg.addr + seg.size)
            gap = nxt - addr
            small = seg.segment_type == "small"
            if gap >= size and not self.rules.should_split(gap, size, small):
                size = gap  # handed out whole
            size = min(size, max(gap, 0)) or size
        self.estimated += 1
        self.blocks[addr] = _Blk(addr, size, requested, state, frames)

    def segment_list(self) -> tuple[list[dict], list[_Blk]]:
        """(segments in the snapshot's shape, with gaps as inactive blocks; live blocks in no segment)."""
        out = []
        placed: set[int] = set()
        for s in sorted(self.segments.values(), key=lambda s: s.addr):
            end = s.addr + s.size
            inside = sorted((b for a, b in self.blocks.items() if s.addr <= a < end),
                            key=lambda b: b.addr)
            blocks, at = [], s.addr
            for b in inside:
                placed.add(b.addr)
                if b.addr < at:  # overlaps the block before: the state is inconsistent there
                    self.misses += 1
                    continue
                if b.addr > at:
                    blocks.append(dict(address=at, size=b.addr - at, requested_size=0,
                                       state=_INACTIVE, frames=[]))
                size = min(b.size, end - b.addr)
                blocks.append(dict(address=b.addr, size=size, requested_size=b.requested,
                                   state=b.state, frames=b.frames or []))
                at = b.addr + size
            if at < end:
                blocks.append(dict(address=at, size=end - at, requested_size=0, state=_INACTIVE,
                                   frames=[]))
            out.append(dict(address=s.addr, total_size=s.size, stream=s.stream,
                            segment_type=s.segment_type, is_expandable=s.is_expandable,
                            blocks=blocks))
        orphans = [b for a, b in sorted(self.blocks.items()) if a not in placed]
        return out, orphans


# -- import ---------------------------------------------------------------------------
class _Interner:
    def __init__(self):
        self.frame_ids: dict[tuple, int] = {}
        self.stack_ids: dict[tuple, int] = {}

    def stack(self, frames) -> int | None:
        if not frames or not isinstance(frames, list):
            return None
        key = tuple(self.frame_ids.setdefault(
            (str(f.get("filename", "?")), _line(f.get("line")), str(f.get("name", "?"))),
            len(self.frame_ids)) for f in frames if isinstance(f, dict))
        if not key:
            return None
        return self.stack_ids.setdefault(key, len(self.stack_ids))

    def tables(self) -> tuple[dict, dict]:
        frames = sorted((fid, k) for k, fid in self.frame_ids.items())
        stacks = sorted((sid, list(k)) for k, sid in self.stack_ids.items())
        return ({"frame_id": [f[0] for f in frames], "filename": [f[1][0] for f in frames],
                 "line": [f[1][1] for f in frames], "function": [f[1][2] for f in frames]},
                {"stack_id": [s[0] for s in stacks], "frame_ids": [s[1] for s in stacks]})


def _line(v) -> int:
    return v if _is_int(v) and -(1 << 31) <= v < (1 << 31) else 0


def tag_of(user_metadata) -> str:
    """A vramscope tag for an entry's user_metadata: taken whole if it is one, else the module."""
    if not user_metadata or not isinstance(user_metadata, str):
        return ""
    if user_metadata.startswith(markers.PREFIX) or user_metadata.count(TAG_SEP) == 2:
        return user_metadata
    return make_tag(None, user_metadata, None)


def _segment_rows(segments: list[dict], kind: str, ts_us: int, event_index: int,
                  interner: _Interner) -> dict:
    cols: dict[str, list] = {k: [] for k in (
        "snapshot", "ts_us", "event_index", "segment_addr", "segment_bytes", "stream",
        "segment_type", "is_expandable", "block_addr", "block_bytes", "requested_bytes",
        "state", "stack_id")}
    for seg in segments:
        addr = seg["address"]
        for b in seg.get("blocks", []):
            baddr = b.get("address", addr)
            row = (kind, ts_us, event_index, seg["address"], seg["total_size"],
                   int(seg.get("stream", 0) or 0), seg.get("segment_type") or "large",
                   bool(seg.get("is_expandable", False)), baddr, b["size"],
                   b.get("requested_size"), b["state"], interner.stack(b.get("frames")))
            for k, v in zip(cols, row):
                cols[k].append(v)
            addr = baddr + b["size"]
    return cols


def import_snapshot(path, out_dir="traces", name: str | None = None,
                    device: int | None = None) -> tuple[Path, dict]:
    """Write a vramscope trace from a snapshot pickle; returns (run directory, import facts)."""
    from profiler.trace.writer import TraceWriter  # pyarrow only when importing

    snap = load_snapshot(path)
    dev = pick_device(snap, device)
    traces = snap.get("device_traces", [])
    entries = [e for e in (traces[dev] if dev < len(traces) else [])]
    seg_end = [s for s in snap.get("segments", []) if (s.get("device", 0) or 0) == dev]
    settings = snap.get("allocator_settings") or {}
    rules = AllocatorRules.from_settings(settings if isinstance(settings, dict) else {})

    rw = Rewind.from_segments(seg_end, rules)
    for e in reversed(entries):
        rw.undo(e)
    seg_start, orphans = rw.segment_list()

    # Replay forward from the rebuilt start, as finalize will, for the peaks.
    replay = BlockReplay(rules)
    replay.load_segments((s["address"], s["total_size"], s["segment_type"], b["address"],
                          b["size"], b["state"]) for s in seg_start for b in s["blocks"])
    actions = [e["action"] for e in entries]
    addrs = [e.get("addr", 0) for e in entries]
    sizes = [e.get("size", 0) for e in entries]
    bsizes = block_sizes(actions, addrs, sizes, replay)
    baseline = sum(b["size"] for s in seg_start for b in s["blocks"] if b["state"] != _INACTIVE)
    baseline += sum(rules.round_size(b.requested) for b in orphans)
    reserved = sum(s["total_size"] for s in seg_start)
    cur, peak, cur_r, peak_r = baseline, baseline, reserved, reserved
    for a, size, bs in zip(actions, sizes, bsizes):
        if a == "alloc":
            cur += bs
            peak = max(peak, cur)
        elif a == "free_completed":
            cur -= bs
        elif a in ("segment_alloc", "segment_map"):
            cur_r += size
            peak_r = max(peak_r, cur_r)
        elif a in ("segment_free", "segment_unmap"):
            cur_r -= size

    # A wrapped ring (or history enabled mid-run): frees of blocks the trace never allocated.
    seen_alloc: set[int] = set()
    starts_mid_run = False
    for a, addr in zip(actions, addrs):
        if a == "alloc":
            seen_alloc.add(addr)
        elif a in ("free_requested", "free_completed") and addr not in seen_alloc:
            starts_mid_run = True
            break

    facts = dict(
        source=str(path), device=dev, devices={str(d): v for d, v in snapshot_devices(snap).items()},
        entries=len(entries), rewind_misses=rw.misses, estimated_block_sizes=rw.estimated,
        start_blocks_outside_segments=len(orphans), trace_starts_mid_run=starts_mid_run,
        forward_replay_misses=replay.misses,
    )
    meta = dict(
        backend=schema.Backend.CUDA.value, device="imported from snapshot",
        device_index=dev, torch_version=str(snap.get("torch_version") or "unknown"),
        config={}, allocator_settings=settings if isinstance(settings, dict) else {},
        baseline_allocated_bytes=int(baseline), max_allocated_bytes=int(peak),
        max_allocated_source="replay", max_reserved_bytes=int(peak_r),
        max_reserved_source="replay", baseline_reserved_bytes=int(reserved),
        # A snapshot does not say how many entries its ring dropped.
        events_dropped=0, events_dropped_known=False, imported=facts,
    )
    name = name or Path(path).stem or "imported"
    writer = TraceWriter(out_dir, name, meta)
    interner = _Interner()
    t0 = entries[0].get("time_us", 0) if entries else 0
    t_end = entries[-1].get("time_us", 0) if entries else 0
    writer.append("segments", _segment_rows(seg_start, schema.SnapshotKind.START.value,
                                            int(t0 or 0), 0, interner))
    if entries:
        writer.append("events", {
            "ts_us": [int(e.get("time_us", 0) or 0) for e in entries],
            "action": actions,
            "addr": [int(a or 0) for a in addrs],
            "size_bytes": [int(s or 0) for s in sizes],
            "stream": [int(e.get("stream", 0) or 0) for e in entries],
            "step": [0] * len(entries),
            "tag": [tag_of(e.get("user_metadata")) for e in entries],
            "stack_id": [interner.stack(e.get("frames")) for e in entries],
        })
    writer.append("segments", _segment_rows(seg_end, schema.SnapshotKind.END.value,
                                            int(t_end or 0), len(entries), interner))
    frames, stacks = interner.tables()
    writer.append("frames", frames)
    writer.append("stacks", stacks)
    status = schema.Status.OOM.value if "oom" in actions else schema.Status.COMPLETE.value
    run_dir = writer.finalize(status)
    return run_dir, facts


# -- export ---------------------------------------------------------------------------
def _frames_by_stack(trace) -> dict[int, list[dict]]:
    fr = trace.frames
    by_id = {int(i): {"filename": str(f), "line": int(l), "name": str(n)}
             for i, f, l, n in zip(fr["frame_id"], fr["filename"], fr["line"], fr["function"])}
    return {int(s): [dict(by_id[int(i)]) for i in ids if int(i) in by_id]
            for s, ids in zip(trace.stacks["stack_id"], trace.stacks["frame_ids"])}


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
    cols = [ev[c].tolist() for c in ("action", "addr", "size_bytes", "stream", "ts_us", "stack_id",
                                     "phase", "module", "category")]
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


def _segments_of(trace, stacks) -> list[dict]:
    seg = trace.segments
    if seg.empty:
        return []
    kinds = set(seg["snapshot"].astype(str))
    kind = "end" if "end" in kinds else "start" if "start" in kinds else None
    if kind is None:
        return []
    seg = seg[seg["snapshot"].astype(str) == kind]
    out: dict[int, dict] = {}
    rows = zip(*(seg[c].tolist() for c in ("segment_addr", "segment_bytes", "stream", "segment_type",
                                           "is_expandable", "block_addr", "block_bytes",
                                           "requested_bytes", "state", "stack_id")))
    for s_addr, s_bytes, stream, s_type, expandable, b_addr, b_bytes, req, state, sid in rows:
        s_addr = _opt_int(s_addr)
        if s_addr is None:
            continue
        s = out.get(s_addr)
        if s is None:
            s = out[s_addr] = {
                "device": 0, "address": s_addr, "total_size": _opt_int(s_bytes) or 0,
                "allocated_size": 0, "active_size": 0, "requested_size": 0,
                "stream": _opt_int(stream) or 0, "segment_type": _opt_str(s_type) or "large",
                "segment_pool_id": (0, 0), "is_expandable": bool(expandable) if expandable == expandable
                and expandable is not None else False, "frames": [], "blocks": [],
            }
        size = _opt_int(b_bytes) or 0
        state = _opt_str(state) or _INACTIVE
        requested = _opt_int(req)
        requested = size if requested is None and state != _INACTIVE else requested or 0
        sid = _opt_int(sid)
        s["blocks"].append({"address": _opt_int(b_addr) or s_addr, "size": size,
                            "requested_size": requested, "state": state,
                            "frames": [dict(f) for f in stacks.get(sid, [])] if sid is not None else []})
        if state == _ALLOCATED:
            s["allocated_size"] += size
        if state != _INACTIVE:
            s["active_size"] += size
            s["requested_size"] += requested
    for s in out.values():
        s["blocks"].sort(key=lambda b: b["address"])
    return [out[a] for a in sorted(out)]


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


__all__ = ["load_snapshot", "check_snapshot", "pick_device", "import_snapshot", "snapshot_of",
           "export_memory_viz", "tag_of", "Rewind", "parse_tag"]
