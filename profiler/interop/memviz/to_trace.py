"""A vramscope trace from a torch memory snapshot.

The segment map at the start of the history is rebuilt by the rewind (rewind.py).
A snapshot has no allocator counters, so max_allocated_bytes is the peak of a
replay of block sizes from that start (meta `max_allocated_source: replay`), and
what the rewind estimated is counted in meta.json (`imported`). Phases are
unknown: module and category come from `user_metadata` alone (a vramscope tag
"phase|module|category" is taken whole; any other string is taken as the module).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from profiler.interop.memviz.load import is_int, load_snapshot, pick_device, snapshot_devices
from profiler.interop.memviz.rewind import Rewind
from profiler.trace import schema
from profiler.trace.finalize import markers
from profiler.trace.finalize.blocks import AllocatorRules, BlockReplay, block_sizes
from profiler.trace.tags import TAG_SEP, make_tag

_INACTIVE = schema.BlockState.INACTIVE.value


class _Interner:
    """Ids for distinct frames and stacks, as the frames and stacks tables hold them."""

    def __init__(self):
        self.frame_ids: dict[tuple, int] = {}
        self.stack_ids: dict[tuple, int] = {}

    def stack(self, frames) -> int | None:
        if not frames or not isinstance(frames, list):
            return None
        key = tuple(
            self.frame_ids.setdefault(
                (str(f.get("filename", "?")), _line(f.get("line")), str(f.get("name", "?"))), len(self.frame_ids)
            )
            for f in frames
            if isinstance(f, dict)
        )
        if not key:
            return None
        return self.stack_ids.setdefault(key, len(self.stack_ids))

    def tables(self) -> tuple[dict, dict]:
        frames = sorted((fid, k) for k, fid in self.frame_ids.items())
        stacks = sorted((sid, list(k)) for k, sid in self.stack_ids.items())
        return (
            {
                "frame_id": [f[0] for f in frames],
                "filename": [f[1][0] for f in frames],
                "line": [f[1][1] for f in frames],
                "function": [f[1][2] for f in frames],
            },
            {"stack_id": [s[0] for s in stacks], "frame_ids": [s[1] for s in stacks]},
        )


def _line(v) -> int:
    return v if is_int(v) and -(1 << 31) <= v < (1 << 31) else 0


def tag_of(user_metadata) -> str:
    """A vramscope tag for an entry's user_metadata: taken whole if it is one, else the module."""
    if not user_metadata or not isinstance(user_metadata, str):
        return ""
    if user_metadata.startswith(markers.PREFIX) or user_metadata.count(TAG_SEP) == 2:
        return user_metadata
    return make_tag(None, user_metadata, None)


def _segment_rows(segments: list[dict], kind: str, ts_us: int, event_index: int, interner: _Interner) -> dict:
    cols: dict[str, list] = {
        k: []
        for k in (
            "snapshot",
            "ts_us",
            "event_index",
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
    }
    for seg in segments:
        addr = seg["address"]
        for b in seg.get("blocks", []):
            baddr = b.get("address", addr)
            row = (
                kind,
                ts_us,
                event_index,
                seg["address"],
                seg["total_size"],
                int(seg.get("stream", 0) or 0),
                seg.get("segment_type") or "large",
                bool(seg.get("is_expandable", False)),
                baddr,
                b["size"],
                b.get("requested_size"),
                b["state"],
                interner.stack(b.get("frames")),
            )
            for k, v in zip(cols, row):
                cols[k].append(v)
            addr = baddr + b["size"]
    return cols


@dataclass
class _Replay:
    """Allocated and reserved bytes at the rebuilt start and at their peaks."""

    baseline_allocated: int
    max_allocated: int
    baseline_reserved: int
    max_reserved: int
    misses: int  # entries the forward replay could not place


def import_snapshot(path, out_dir="traces", name: str | None = None, device: int | None = None) -> tuple[Path, dict]:
    """Write a vramscope trace from a snapshot pickle; returns (run directory, import facts)."""
    from profiler.trace.writer import TraceWriter  # pyarrow only when importing

    snap = load_snapshot(path)
    dev = pick_device(snap, device)
    traces = snap.get("device_traces", [])
    entries = list(traces[dev]) if dev < len(traces) else []
    seg_end = [s for s in snap.get("segments", []) if (s.get("device", 0) or 0) == dev]
    settings = snap.get("allocator_settings") or {}
    settings = settings if isinstance(settings, dict) else {}
    rules = AllocatorRules.from_settings(settings)

    rw = Rewind.from_segments(seg_end, rules)
    for e in reversed(entries):
        rw.undo(e)
    seg_start, orphans = rw.segment_list()
    replay = _replay(entries, seg_start, orphans, rules)

    facts = dict(
        source=str(path),
        device=dev,
        devices={str(d): v for d, v in snapshot_devices(snap).items()},
        entries=len(entries),
        rewind_misses=rw.misses,
        estimated_block_sizes=rw.estimated,
        start_blocks_outside_segments=len(orphans),
        trace_starts_mid_run=_starts_mid_run(entries),
        forward_replay_misses=replay.misses,
    )
    name = name or Path(path).stem or "imported"
    writer = TraceWriter(out_dir, name, _meta(snap, dev, settings, replay, facts))
    _write_tables(writer, entries, seg_start, seg_end)
    oom = any(e["action"] == "oom" for e in entries)
    status = schema.Status.OOM.value if oom else schema.Status.COMPLETE.value
    run_dir = writer.finalize(status)
    return run_dir, facts


def _replay(entries: list[dict], seg_start: list[dict], orphans: list, rules: AllocatorRules) -> _Replay:
    """Replay forward from the rebuilt start, as finalize will, for the peaks."""
    replay = BlockReplay(rules)
    replay.load_segments(
        (s["address"], s["total_size"], s["segment_type"], b["address"], b["size"], b["state"])
        for s in seg_start
        for b in s["blocks"]
    )
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
    return _Replay(baseline, peak, reserved, peak_r, replay.misses)


def _starts_mid_run(entries: list[dict]) -> bool:
    """A wrapped ring (or history enabled mid-run): frees of blocks the trace never allocated."""
    seen_alloc: set[int] = set()
    for e in entries:
        a, addr = e["action"], e.get("addr", 0)
        if a == "alloc":
            seen_alloc.add(addr)
        elif a in ("free_requested", "free_completed") and addr not in seen_alloc:
            return True
    return False


def _meta(snap: dict, dev: int, settings: dict, replay: _Replay, facts: dict) -> dict:
    return dict(
        backend=schema.Backend.CUDA.value,
        device="imported from snapshot",
        device_index=dev,
        torch_version=str(snap.get("torch_version") or "unknown"),
        config={},
        allocator_settings=settings,
        baseline_allocated_bytes=int(replay.baseline_allocated),
        max_allocated_bytes=int(replay.max_allocated),
        max_allocated_source="replay",
        max_reserved_bytes=int(replay.max_reserved),
        max_reserved_source="replay",
        baseline_reserved_bytes=int(replay.baseline_reserved),
        # A snapshot does not say how many entries its ring dropped.
        events_dropped=0,
        events_dropped_known=False,
        imported=facts,
    )


def _write_tables(writer, entries: list[dict], seg_start: list[dict], seg_end: list[dict]) -> None:
    """The start segment map, the events, the end segment map, then the frames and stacks they use."""
    interner = _Interner()
    t0 = entries[0].get("time_us", 0) if entries else 0
    t_end = entries[-1].get("time_us", 0) if entries else 0
    writer.append("segments", _segment_rows(seg_start, schema.SnapshotKind.START.value, int(t0 or 0), 0, interner))
    if entries:
        writer.append(
            "events",
            {
                "ts_us": [int(e.get("time_us", 0) or 0) for e in entries],
                "action": [e["action"] for e in entries],
                "addr": [int(e.get("addr", 0) or 0) for e in entries],
                "size_bytes": [int(e.get("size", 0) or 0) for e in entries],
                "stream": [int(e.get("stream", 0) or 0) for e in entries],
                "step": [0] * len(entries),
                "tag": [tag_of(e.get("user_metadata")) for e in entries],
                "stack_id": [interner.stack(e.get("frames")) for e in entries],
            },
        )
    writer.append(
        "segments", _segment_rows(seg_end, schema.SnapshotKind.END.value, int(t_end or 0), len(entries), interner)
    )
    frames, stacks = interner.tables()
    writer.append("frames", frames)
    writer.append("stacks", stacks)
