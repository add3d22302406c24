"""A vramscope trace from a torch memory snapshot.

The segment map at the start of the history is rebuilt by the rewind (rewind.py).
A snapshot has no allocator counters, so max_allocated_bytes is the peak of a
replay of block sizes from that start (meta `max_allocated_source: replay`), and
what the rewind estimated is counted in meta.json (`imported`). Phases are
unknown: module and category come from `user_metadata` alone (a vramscope tag
"phase|module|category" is taken whole; any other string is taken as the module).
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from profiler.errors import TraceError
from profiler.interop.memviz.load import (
    is_int,
    load_snapshot,
    pick_device,
    pickle_size,
    plain_settings,
    show,
    snapshot_devices,
)
from profiler.interop.memviz.rewind import Rewind
from profiler.interop.memviz.window import Bound, entry_range
from profiler.trace import schema
from profiler.trace.finalize import markers
from profiler.trace.finalize.blocks import AllocatorRules, BlockReplay, block_sizes
from profiler.trace.tags import TAG_SEP, make_tag

_INACTIVE = schema.BlockState.INACTIVE.value
Progress = Callable[[str, int, int], None]
MAX_STACK_DEPTH = 1024  # frames kept per stack, innermost first
MAX_TEXT = 4096  # characters kept of a file or function name


class _Interner:
    """Ids for distinct frames and stacks, as the frames and stacks tables hold them.

    torch builds each distinct frame dict once and each distinct traceback's list once, and
    pickle keeps that sharing, so a list or dict met again is looked up by identity and never
    walked twice (the snapshot keeps them alive, so their ids stay theirs). A stack keeps its
    innermost MAX_STACK_DEPTH frames; `truncated` counts the stacks cut."""

    def __init__(self):
        self.frame_ids: dict[tuple, int] = {}
        self.stack_ids: dict[tuple, int] = {}
        self._frame_of: dict[int, int] = {}  # id(frame dict) -> frame id
        self._stack_of: dict[int, int | None] = {}  # id(frames list) -> stack id
        self.truncated = 0

    def stack(self, frames) -> int | None:
        if not frames or not isinstance(frames, list):
            return None
        known = self._stack_of.get(id(frames), -1)
        if known != -1:
            return known
        if len(frames) > MAX_STACK_DEPTH:
            self.truncated += 1
        key = tuple(self._frame(f) for f in frames[:MAX_STACK_DEPTH] if isinstance(f, dict))
        sid = self.stack_ids.setdefault(key, len(self.stack_ids)) if key else None
        self._stack_of[id(frames)] = sid
        return sid

    def _frame(self, f: dict) -> int:
        fid = self._frame_of.get(id(f))
        if fid is None:
            key = (_text(f.get("filename")), _line(f.get("line")), _text(f.get("name")))
            fid = self._frame_of[id(f)] = self.frame_ids.setdefault(key, len(self.frame_ids))
        return fid

    def tables(self) -> tuple[dict, dict]:
        frames = sorted((fid, k) for k, fid in self.frame_ids.items())
        stacks = sorted((sid, k) for k, sid in self.stack_ids.items())  # ids are dense: already in order
        return (
            {
                "frame_id": [f[0] for f in frames],
                "filename": [f[1][0] for f in frames],
                "line": [f[1][1] for f in frames],
                "function": [f[1][2] for f in frames],
            },
            {"stack_id": [s[0] for s in stacks], "frame_ids": [s[1] for s in stacks]},
        )


def _text(v) -> str:
    return v[:MAX_TEXT] if isinstance(v, str) else "?"


def _line(v) -> int:
    return v if is_int(v) and -(1 << 31) <= v < (1 << 31) else 0


def tag_of(user_metadata) -> str:
    """A vramscope tag for an entry's user_metadata: taken whole if it is one, else the module."""
    if not user_metadata or not isinstance(user_metadata, str):
        return ""
    user_metadata = user_metadata[:MAX_TEXT]
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


def import_snapshot(
    path,
    out_dir="traces",
    name: str | None = None,
    device: int | None = None,
    since: Bound | None = None,
    until: Bound | None = None,
    progress: Progress | None = None,
) -> tuple[Path, dict]:
    """Write a vramscope trace from a snapshot pickle; returns (run directory, import facts).
    `since`/`until` keep a window of the device's entries (window.py); `progress(stage, done,
    total)` is told how far reading (bytes) and rewinding (entries) have got."""
    from profiler.trace.writer import TraceWriter  # pyarrow only when importing

    size = pickle_size(path)
    snap = load_snapshot(path, (lambda done: progress("reading", done, size)) if progress else None)
    dev = pick_device(snap, device)
    traces = snap.get("device_traces", [])
    entries = traces[dev] if dev < len(traces) else []
    seg_end = [s for s in snap.get("segments", []) if (s.get("device", 0) or 0) == dev]
    settings = plain_settings(snap.get("allocator_settings"))
    try:
        rules = AllocatorRules.from_settings(settings)
    except (TypeError, ValueError, OverflowError):
        raise TraceError(f"{path}: allocator_settings are not torch's: {show(settings)}") from None

    first, end = entry_range([e.get("time_us") or 0 for e in entries], since, until)
    rw = Rewind.from_segments(seg_end, rules)
    _undo(rw, entries, end, len(entries), progress)
    if end < len(entries):  # the window ends before the dump: its end state is the rewind's there
        seg_end = rw.segment_list()[0]
    _undo(rw, entries, first, end, progress)
    entries = entries[first:end]
    seg_start, orphans = rw.segment_list()
    replay = _replay(entries, seg_start, orphans, rules)

    facts = dict(
        source=str(path),
        device=dev,
        devices={str(d): v for d, v in snapshot_devices(snap).items()},
        entries=len(entries),
        window=None if since is None and until is None else {"first_entry": first, "end_entry": end},
        rewind_misses=rw.misses,
        estimated_block_sizes=rw.estimated,
        start_blocks_outside_segments=len(orphans),
        trace_starts_mid_run=_starts_mid_run(entries),
        forward_replay_misses=replay.misses,
    )
    name = name or Path(path).stem or "imported"
    writer = TraceWriter(out_dir, name, _meta(snap, dev, settings, replay, facts))
    facts["stacks_truncated"] = _write_tables(writer, entries, seg_start, seg_end)
    status = schema.Status.OOM.value if any(e["action"] == "oom" for e in entries) else schema.Status.COMPLETE.value
    # The tables are on disk: let the snapshot's objects go before finalizing reads them back,
    # so that the two never take memory at once.
    writer.flush()
    del snap, traces, entries, seg_end, seg_start, orphans, rw
    gc.collect()
    run_dir = writer.finalize(status)
    return run_dir, facts


def _undo(rw: Rewind, entries: list, first: int, end: int, progress: Progress | None) -> None:
    """Undo entries[first:end], newest first."""
    step = 1 << 16
    for i in range(end - 1, first - 1, -1):
        rw.undo(entries[i])
        if progress and i % step == 0:
            progress("rewinding", len(entries) - i, len(entries))


def _replay(entries: list[dict], seg_start: list[dict], orphans: list, rules: AllocatorRules) -> _Replay:
    """Replay forward from the rebuilt start, as finalize will, for the peaks."""
    replay = BlockReplay(rules)
    replay.load_segments(
        (s["address"], s["total_size"], s["segment_type"], b["address"], b["size"], b["state"])
        for s in seg_start
        for b in s["blocks"]
    )
    actions = [e["action"] for e in entries]
    addrs = [e.get("addr") or 0 for e in entries]
    sizes = [e.get("size") or 0 for e in entries]
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
        a, addr = e["action"], e.get("addr") or 0
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
        torch_version=_text(snap.get("torch_version")) if snap.get("torch_version") else "unknown",
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


def _write_tables(writer, entries: list[dict], seg_start: list[dict], seg_end: list[dict]) -> int:
    """The start segment map, the events, the end segment map, then the frames and stacks they use;
    returns how many stacks were cut to MAX_STACK_DEPTH."""
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
    return interner.truncated
