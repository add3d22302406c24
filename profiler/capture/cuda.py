"""CUDA backend: the caching allocator's own memory history, drained as a stream.

The allocator keeps its trace in a ring buffer that overwrites silently when
full. We drain it at every step boundary (and on a timer during long stretches
without steps): snapshot, then re-enable with `clear_history`, so each drain
costs only the events since the last one and host memory stays bounded.
Drops are never silent: the allocator's cumulative allocation counter says how
many allocs happened, and any the drained stream lacks are counted as dropped.

Costs measured on an H100 (torch 2.11): a snapshot is about 1 us per entry with
Python stacks; `_cuda_memoryStats` is 24 us where `memory_stats()` is 310 us.
"""

from __future__ import annotations

import gc
import operator
from typing import TYPE_CHECKING

import torch

from profiler.capture.frames import StackInterner
from profiler.trace.finalize.markers import marker_tag

if TYPE_CHECKING:
    from profiler.capture.compiled import CompiledTags

_memory = torch.cuda.memory
_KEEP_STATS = (
    ("allocated_bytes", "allocated_bytes", "current"),
    ("reserved_bytes", "reserved_bytes", "current"),
    ("active_bytes", "active_bytes", "current"),
    ("inactive_split_bytes", "inactive_split_bytes", "current"),
    ("max_allocated_bytes", "allocated_bytes", "peak"),
    ("max_reserved_bytes", "reserved_bytes", "peak"),
)


_ENTRY_FIELDS = operator.itemgetter("time_us", "action", "addr", "size", "stream", "user_metadata")


def _all(stats: dict, key: str, which: str) -> int:
    return int(stats.get(key, {}).get("all", {}).get(which, 0))


class CudaBackend:
    """The Backend (profiler/capture/backend.py) over the CUDA caching allocator."""

    name = "cuda"
    device_type = "cuda"
    capture_path = "python"  # meta.json's capture_path (native_cuda.py is "native")
    capture_path_error: str | None = None  # why the native path did not run, if it was tried
    # A snapshot costs about 1 us per entry: drain on the timer, and mark steps instead.
    positions_need_drain = False

    def __init__(self, device=None, stacks: bool = True, max_entries: int = 1_000_000):
        self.device = torch.device(
            "cuda", torch.cuda.current_device() if device is None else torch.device(device).index or 0
        )
        self.index = self.device.index
        self.stacks = stacks
        self.max_entries = max_entries
        self.set_tag = torch._C._cuda_setMemoryMetadata
        self.get_tag = torch._C._cuda_getMemoryMetadata
        self.interner = StackInterner()
        self.events_seen = 0
        self.dropped = 0
        self._allocs_seen = 0
        self._allocs_at_start = 0
        self._marker_id = -1
        self.start_segments: dict | None = None
        self.compiled: CompiledTags | None = None

    # -- lifecycle ------------------------------------------------------------------
    def _enable(self, clear: bool, stacks: bool | None = None) -> None:
        stacks = self.stacks if stacks is None else stacks
        _memory._record_memory_history(
            "all",
            context="alloc" if stacks else None,  # frees inherit their alloc's stack
            stacks="python",
            max_entries=self.max_entries,
            device=self.device,
            clear_history=clear,
        )

    def start(self) -> dict:
        """Begin recording; returns run-level facts for meta.json."""
        with torch.cuda.device(self.device):
            torch.cuda.reset_peak_memory_stats(self.device)
            self._enable(clear=True)
            self.set_tag("")
            stats = torch._C._cuda_memoryStats(self.index)
            self._allocs_at_start = _all(stats, "allocation", "allocated")
            snap = torch._C._cuda_memorySnapshot(None)
            self._enable(clear=True)  # the snapshot left an entry of its own
        self.start_segments = self.segment_rows(snap, "start", 0, 0)
        props = torch.cuda.get_device_properties(self.device)
        return dict(
            device=props.name,
            device_index=self.index,
            device_total_bytes=int(props.total_memory),
            allocator_settings=snap.get("allocator_settings") or {},
            baseline_allocated_bytes=_all(stats, "allocated_bytes", "current"),
            baseline_reserved_bytes=_all(stats, "reserved_bytes", "current"),
            capture_path=self.capture_path,
            **({"capture_path_error": self.capture_path_error} if self.capture_path_error else {}),
        )

    def stop(self) -> None:
        _memory._record_memory_history(None, device=self.device)
        self.set_tag("")

    # -- draining -------------------------------------------------------------------
    def drain(self, step: int, with_segments: bool = False) -> dict | None:
        """Events since the last drain, as writer columns (None when there are none).

        `with_segments` also takes the segment map at that exact point (segments_now).
        """
        gc_was_enabled = gc.isenabled()
        gc.disable()  # the snapshot's many short-lived objects would trigger full collections
        try:
            return self._drain(step, with_segments)
        finally:
            if gc_was_enabled:
                gc.enable()

    def _drain(self, step: int, with_segments: bool = False) -> dict | None:
        # The snapshot always carries the segment map too; torch has no cheaper way
        # to read the trace alone (a pool-filtered snapshot crashed the allocator).
        snap = torch._C._cuda_memorySnapshot(None)
        self._enable(clear=True)
        stats = torch._C._cuda_memoryStats(self.index)
        trace = snap["device_traces"][self.index] if snap["device_traces"] else []
        self._last_segments = snap["segments"]
        if not trace:
            self._count_drops(0, stats)
            return None
        try:  # one C-level pass per event
            ts, action, addr, size, stream, tag = zip(*map(_ENTRY_FIELDS, trace))
        except KeyError:  # an entry without some field (an oom entry has no addr)
            ts, action, addr, size, stream, tag = zip(
                *(
                    (
                        e.get("time_us", 0),
                        e["action"],
                        e.get("addr", 0),
                        e.get("size", 0),
                        e.get("stream", 0),
                        e.get("user_metadata") or "",
                    )
                    for e in trace
                )
            )
        self._count_drops(action.count("alloc"), stats)
        n = len(trace)
        self.events_seen += n
        stack_ids = self._stack_ids(trace) if self.stacks else None
        if stack_ids is not None and self.compiled is not None:
            tag = self.compiled.retag(tag, stack_ids)
        return {
            "ts_us": ts,
            "action": action,
            "addr": addr,
            "size_bytes": size,
            "stream": stream,
            "step": [step] * n,
            "tag": tag,
            "stack_id": stack_ids,
        }

    def _count_drops(self, allocs: int, stats: dict) -> None:
        self._allocs_seen += allocs
        expected = _all(stats, "allocation", "allocated") - self._allocs_at_start
        self.dropped = max(self.dropped, expected - self._allocs_seen)

    def _stack_ids(self, trace: list) -> list:
        # Frame lists arrive as distinct objects; a tuple of their frame dicts' ids is a
        # cheap key within one snapshot, and content is interned once per new key.
        by_ids: dict[tuple, int | None] = {}
        out: list[int | None] = []
        intern = self.interner
        compiled = self.compiled
        for e in trace:
            frames = e.get("frames")
            if not frames:
                out.append(None)
                continue
            key = tuple(map(id, frames))
            sid = by_ids.get(key, -1)
            if sid == -1:
                sid = by_ids[key] = intern.stack_of_frames(frames)
                if compiled is not None and sid is not None:
                    compiled.see_stack(sid, frames)
            out.append(sid)
        return out

    def attribute_compiled(self, tags: CompiledTags) -> None:
        self.compiled = tags

    def adopt(self, module) -> None:
        pass  # tensors that pre-date the capture are in the start segment map

    def pause_stacks(self, paused: bool) -> None:
        """Stop gathering Python stacks while backward runs.

        Backward allocates on autograd's device thread, which has no Python frames,
        yet gathering a Python stack still takes the GIL for each allocation on
        that thread, which is then on the critical path of kernel launches.
        """
        if self.stacks:
            self._enable(clear=False, stacks=not paused)

    def mark(self, step: int) -> int:
        """Drop a step/position marker into the stream; returns its role position (< 0).

        See profiler.trace.finalize.markers: a tagged 512-byte alloc and free, a few microseconds,
        ordered by the allocator with every other event. The caller re-tags.
        """
        self._marker_id += 1
        self.set_tag(marker_tag(self._marker_id, step))
        torch.empty(1, dtype=torch.uint8, device=self.device)
        return -(self._marker_id + 1)

    def position(self, step: int) -> int:
        """A marker: exact without draining (the caller re-tags)."""
        return self.mark(step)

    def stats_row(self) -> dict:
        s = torch._C._cuda_memoryStats(self.index)  # 24 us; the counters at this moment
        row = {name: _all(s, key, which) for name, key, which in _KEEP_STATS}
        row["num_alloc_retries"] = int(s.get("num_alloc_retries", 0))
        row["num_ooms"] = int(s.get("num_ooms", 0))
        return row

    def peaks(self) -> dict:
        s = torch._C._cuda_memoryStats(self.index)
        return dict(
            max_allocated_bytes=_all(s, "allocated_bytes", "peak"), max_reserved_bytes=_all(s, "reserved_bytes", "peak")
        )

    # -- segment maps ----------------------------------------------------------------
    def segment_rows(self, snap: dict, kind: str, ts_us: int, event_index: int) -> dict:
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
                "segment_pool",
                "block_addr",
                "block_bytes",
                "requested_bytes",
                "state",
                "stack_id",
            )
        }
        for seg in snap.get("segments", []):
            if seg.get("device", self.index) != self.index:
                continue
            for blk in seg["blocks"]:
                frames = blk.get("frames") if self.stacks else None
                sid = self.interner.stack_of_frames(frames) if frames else None
                for k, v in (
                    ("snapshot", kind),
                    ("ts_us", ts_us),
                    ("event_index", event_index),
                    ("segment_addr", seg["address"]),
                    ("segment_bytes", seg["total_size"]),
                    ("stream", seg["stream"]),
                    ("segment_type", seg["segment_type"]),
                    ("is_expandable", bool(seg.get("is_expandable", False))),
                    ("segment_pool", _pool_id(seg)),
                    ("block_addr", blk["address"]),
                    ("block_bytes", blk["size"]),
                    ("requested_bytes", blk.get("requested_size")),
                    ("state", blk["state"]),
                    ("stack_id", sid),
                ):
                    cols[k].append(v)
        return cols

    def segments_now(self, kind: str, ts_us: int, event_index: int) -> dict:
        """Rows of the segment map taken by the last drain(with_segments=True)."""
        return self.segment_rows({"segments": self._last_segments}, kind, ts_us, event_index)

    def install_oom_observer(self, callback) -> None:
        on_oom(callback)

    def remove_oom_observer(self) -> None:
        clear_oom()


_observers: list = []


def on_oom(callback) -> None:
    """Route the allocator's OOM observer (which cannot be detached) to `callback`."""
    if not _observers:  # a private binding, absent from torch's stubs
        torch._C._cuda_attach_out_of_memory_observer(_dispatch_oom)  # type: ignore[attr-defined]
    _observers.clear()
    _observers.append(callback)


def clear_oom() -> None:
    _observers.clear()


def _dispatch_oom(device, alloc_bytes, device_allocated, device_free):
    for cb in list(_observers):
        cb(device, alloc_bytes, device_allocated, device_free)


def _pool_id(seg: dict) -> str | None:
    """A segment's pool as "a,b" (torch's segment_pool_id pair); None where torch does not say."""
    pool = seg.get("segment_pool_id")
    try:
        return ",".join(str(int(p)) for p in pool) if pool is not None else None
    except (TypeError, ValueError):
        return None
