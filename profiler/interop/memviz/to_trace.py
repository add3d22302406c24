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
from profiler.interop.memviz.entries import MAX_TEXT, Entries, tag_of
from profiler.interop.memviz.load import pick_device, pickle_size, plain_settings, show, snapshot_devices
from profiler.interop.memviz.rewind import Rewind
from profiler.interop.memviz.stacks import MAX_STACK_DEPTH, Interner, StreamStacks
from profiler.interop.memviz.stream import read_snapshot
from profiler.interop.memviz.window import Bound, entry_range
from profiler.trace import schema
from profiler.trace.finalize.blocks import AllocatorRules, BlockReplay, block_sizes

__all__ = ["import_snapshot", "tag_of", "MAX_STACK_DEPTH", "MAX_TEXT"]

_INACTIVE = schema.BlockState.INACTIVE.value
Progress = Callable[[str, int, int], None]


def _segment_rows(segments: list[dict], kind: str, ts_us: int, event_index: int) -> dict:
    """Rows of the segments table; "stack_id" holds each block's frames until ids are assigned."""
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
                b.get("frames"),
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
    read = read_snapshot(path, (lambda done: progress("reading", done, size)) if progress else None)
    snap = read.snap
    dev = pick_device(snap, device)
    entries, seg_end, settings, rules = _device_part(snap, dev, path)
    first, end = entry_range(entries.time_us.tolist(), since, until)
    rw, seg_end = _rewind(entries, seg_end, rules, first, end, progress)
    entries = entries.window(first, end)
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
        reader=read.reader,
    )
    name = name or Path(path).stem or "imported"
    writer = TraceWriter(out_dir, name, _meta(snap, dev, settings, replay, facts))
    facts["stacks_truncated"] = _write_tables(writer, entries, seg_start, seg_end, read.stacks)
    status = schema.Status.OOM.value if "oom" in entries.action else schema.Status.COMPLETE.value
    # The tables are on disk: let the snapshot's objects go before finalizing reads them back,
    # so that the two never take memory at once.
    writer.flush()
    del snap, entries, seg_end, seg_start, orphans, rw, read
    gc.collect()
    run_dir = writer.finalize(status)
    return run_dir, facts


def _device_part(snap: dict, dev: int, path) -> tuple[Entries, list[dict], dict, AllocatorRules]:
    """The device's entries and dump-time segments, and the allocator's settings and rules."""
    traces = snap.get("device_traces", [])
    entries: Entries = traces[dev] if dev < len(traces) else Entries.from_dicts([])
    seg_end = [s for s in snap.get("segments", []) if (s.get("device", 0) or 0) == dev]
    settings = plain_settings(snap.get("allocator_settings"))
    try:
        rules = AllocatorRules.from_settings(settings)
    except (TypeError, ValueError, OverflowError):
        raise TraceError(f"{path}: allocator_settings are not torch's: {show(settings)}") from None
    return entries, seg_end, settings, rules


def _rewind(
    entries: Entries, seg_end: list[dict], rules: AllocatorRules, first: int, end: int, progress: Progress | None
) -> tuple[Rewind, list[dict]]:
    """The allocator state rewound to entry `first`, and the segment map at entry `end`."""
    rw = Rewind.from_segments(seg_end, rules)
    _undo(rw, entries, end, len(entries), progress)
    if end < len(entries):  # the window ends before the dump: its end state is the rewind's there
        seg_end = rw.segment_list()[0]
    _undo(rw, entries, first, end, progress)
    return rw, seg_end


def _undo(rw: Rewind, entries: Entries, first: int, end: int, progress: Progress | None) -> None:
    """Undo entries[first:end], newest first."""
    step = 1 << 16
    for i in range(end - 1, first - 1, -1):
        rw.undo(entries.entry(i))
        if progress and i % step == 0:
            progress("rewinding", len(entries) - i, len(entries))


def _replay(entries: Entries, seg_start: list[dict], orphans: list, rules: AllocatorRules) -> _Replay:
    """Replay forward from the rebuilt start, as finalize will, for the peaks."""
    replay = BlockReplay(rules)
    replay.load_segments(
        (s["address"], s["total_size"], s["segment_type"], b["address"], b["size"], b["state"])
        for s in seg_start
        for b in s["blocks"]
    )
    actions = entries.action
    sizes = entries.size.tolist()
    bsizes = block_sizes(actions, entries.addr.tolist(), sizes, replay)
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


def _starts_mid_run(entries: Entries) -> bool:
    """A wrapped ring (or history enabled mid-run): frees of blocks the trace never allocated."""
    seen_alloc: set[int] = set()
    for a, addr in zip(entries.action, entries.addr.tolist()):
        if a == "alloc":
            seen_alloc.add(addr)
        elif a in ("free_requested", "free_completed") and addr not in seen_alloc:
            return True
    return False


def _meta(snap: dict, dev: int, settings: dict, replay: _Replay, facts: dict) -> dict:
    version = snap.get("torch_version")
    return dict(
        backend=schema.Backend.CUDA.value,
        device="imported from snapshot",
        device_index=dev,
        torch_version=(version[:MAX_TEXT] if isinstance(version, str) else "?") if version else "unknown",
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


def _write_tables(
    writer, entries: Entries, seg_start: list[dict], seg_end: list[dict], stacks: Interner | StreamStacks
) -> int:
    """The start segment map, the events, the end segment map, then the frames and stacks they use;
    returns how many stacks were cut to MAX_STACK_DEPTH."""
    n = len(entries)
    t0 = int(entries.time_us[0]) if n else 0
    t_end = int(entries.time_us[-1]) if n else 0
    start = _segment_rows(seg_start, schema.SnapshotKind.START.value, t0, 0)
    end = _segment_rows(seg_end, schema.SnapshotKind.END.value, t_end, n)
    start["stack_id"], event_stacks, end["stack_id"] = stacks.assign(
        [start["stack_id"], entries.frames, end["stack_id"]]
    )
    writer.append("segments", start)
    writer.append(
        "events",
        {
            "ts_us": entries.time_us,
            "action": entries.action,
            "addr": entries.addr,
            "size_bytes": entries.size,
            "stream": entries.stream,
            "step": [0] * n,
            "tag": entries.tags,
            "stack_id": event_stacks,
        },
    )
    writer.append("segments", end)
    stacks.write(writer)
    return stacks.truncated
