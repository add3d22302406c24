"""CUDA backend fed by the allocator trace tracker (profiler/capture/native).

The same event stream as CudaBackend, without torch's memory history: c10 hands
each trace entry to our tracker as it happens, and a drain takes whole columns
(numpy arrays) instead of a snapshot's per-entry dicts. The tag is a label id the
tracker keeps per thread, so hooks set an int, not a string. Python stacks are
read from the allocating thread's frames without the GIL; a backward allocation
on autograd's thread, which has none, gets the stack of the forward op that made
the node being run.

Segment maps come from torch's snapshot at the start, the end and on OOM only (its
trace is empty here: history stays off). The map at any step boundary is the start
map changed by the segment_alloc/free/map/unmap entries, which the tracker keeps
like any other (profiler/analysis/fragmentation.py replays them).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import torch

from profiler.capture.cuda import CudaBackend, _all
from profiler.capture.frames import StackInterner, own_frame
from profiler.trace.finalize.markers import PREFIX as MARKER_PREFIX
from profiler.trace.finalize.markers import parse_marker

if TYPE_CHECKING:
    from profiler.capture.compiled import CompiledTags

# c10's TraceEntry::Action, in its order.
ACTIONS = (
    "alloc",
    "free_requested",
    "free_completed",
    "segment_alloc",
    "segment_free",
    "segment_map",
    "segment_unmap",
    "snapshot",
    "oom",
)
_ACTIONS = pa.array(ACTIONS, pa.string())
_MAX_DEPTH = 64  # innermost Python frames kept per stack
# The tracker's device_counters, in its order (the first eight; the ninth is allocations made).
_COUNTER_NAMES = (
    "allocated_bytes",
    "reserved_bytes",
    "active_bytes",
    "inactive_split_bytes",
    "max_allocated_bytes",
    "max_reserved_bytes",
    "num_alloc_retries",
    "num_ooms",
)


class NativeColumns:
    """What the tracker's backends share (CUDA here, CPU in native_cpu.py): its labels,
    frames and stacks turned into the writer's tag and stack_id columns."""

    interner: StackInterner
    compiled: CompiledTags | None
    stacks: bool
    events_seen: int
    positions_need_drain: bool

    def set_tag(self, tag: str) -> None:  # each instance calls the tracker's own instead
        self.tracker.set_tag(tag)

    def get_tag(self) -> str:
        return self.tracker.get_tag()

    def _take_tracker(self, tracker) -> None:
        self.tracker = tracker
        self.set_tag = tracker.set_tag  # type: ignore[method-assign]  # no Python layer per call
        self.get_tag = tracker.get_tag  # type: ignore[method-assign]
        self._labels: list[str] = []  # label id -> tag text, as the tracker numbers them
        # label id -> the step of the marker it is, -1 for no marker, -2 for one that names no
        # step; its first len(self._labels) entries (a label a step: grown by doubling)
        self._marker_step = np.zeros(64, dtype=np.int64)
        self._frame_of: list[int] = []  # tracker frame id -> interner frame id
        self._frames_text: list[tuple] = []  # tracker frame id -> (filename, line, name)
        self._stack_of = np.zeros(0, dtype=np.int32)  # tracker stack id -> interner stack id
        self._read_markers: list[int] = []  # label ids of markers the last drain read

    def _columns(self, got: dict, step: int) -> dict | None:
        """A drain's arrays as writer columns, its new frames and stacks interned (None:
        no events)."""
        self._take_stacks(got["new_frames"], got["new_stacks"])
        n = len(got["ts_us"])
        if not n:
            return None
        self.events_seen += n
        known = len(self._labels)
        new_labels = self.tracker.labels_from(known)
        if new_labels:
            self._labels.extend(new_labels)
            if len(self._labels) > len(self._marker_step):
                grown = np.empty(max(2 * len(self._marker_step), len(self._labels)), dtype=np.int64)
                grown[:known] = self._marker_step[:known]
                self._marker_step = grown
            self._marker_step[known : len(self._labels)] = _marker_steps(new_labels)
        # One pass in the tracker: stack ids, action and tag codes, and the sampling's sites.
        codes = self.tracker.drain_codes(
            got["label"],
            got["stack"],
            got["action"],
            self._stack_of,
            self._marker_step,
            len(self._labels),
            not self.positions_need_drain,  # CUDA: markers begin steps; CPU: a drain is one step
            len(ACTIONS),
        )
        stack_ids = codes["stack_id"]
        tag = self._tag_column(got["label"], stack_ids, codes)
        self._forget_markers(known)
        return {
            "ts_us": got["ts_us"],
            # safe=False: the tracker checked each index (a check costs more than the array).
            "action": pa.DictionaryArray.from_arrays(codes["action"], _ACTIONS, safe=False),
            "addr": got["addr"],
            "size_bytes": got["size"],
            "stream": got["stream"],
            "step": np.full(n, step, dtype=np.int32),
            "tag": tag,
            "stack_id": _with_nulls(stack_ids) if self.stacks else None,
            # What hook sampling reads (profiler/capture/sampling.py): each block event's site,
            # in runs of one step. No column of the writer's, which it would decode again.
            "sites": dict(
                keys=codes["site_keys"],
                starts=codes["site_starts"],
                steps=codes["site_steps"],
                last_step=codes["last_step"],
            ),
        }

    def _forget_markers(self, known: int) -> None:
        """Forget the labels of the markers the drain before this one read, and remember this
        drain's new ones (labels from `known` on). One drain late: a marker's own free may be
        the next drain's first event (a drain from the OOM observer, inside the marker's alloc)."""
        if self._read_markers:
            for label in self.tracker.forget_labels(self._read_markers):
                self._labels[label] = ""
        steps = self._marker_step[known : len(self._labels)]
        self._read_markers = (np.flatnonzero(steps != -1) + known).tolist()

    def _take_stacks(self, frames: list, stacks: list) -> None:
        intern = self.interner
        for filename, line, name in frames:
            # vramscope's own frames (module hooks) are left out, as on the other paths: a
            # stack is then the same whether or not hooks ran (frames.py).
            self._frame_of.append(-1 if own_frame(filename) else intern.frame(filename, line, name))
            self._frames_text.append((filename, line, name))
        if not stacks:
            return
        new = np.empty(len(stacks), dtype=np.int32)
        for i, frame_ids in enumerate(stacks):
            kept = [f for f in frame_ids if self._frame_of[f] >= 0]
            sid = intern.stack(tuple(self._frame_of[f] for f in kept)) if kept else -1
            new[i] = sid
            if self.compiled is not None and sid >= 0:
                self.compiled.see_stack(
                    sid,
                    [dict(filename=t[0], line=t[1], name=t[2]) for t in map(self._frames_text.__getitem__, kept)],
                )
        self._stack_of = np.concatenate([self._stack_of, new])

    def _tag_column(self, label: np.ndarray, stack_ids: np.ndarray, codes: dict) -> pa.Array:
        """Labels as a dictionary column of the tags in use; compiled code's renamed per stack."""
        compiled = self.compiled
        if compiled is None or not compiled.renames():
            indices, words = codes["tag_code"], [self._labels[i] for i in codes["tag_used"].tolist()]
        else:
            key = (label.astype(np.int64) << 32) | (stack_ids.astype(np.int64) & 0xFFFFFFFF)
            used, indices = np.unique(key, return_inverse=True)
            indices = indices.astype(np.int32)
            words = [compiled.renamed(self._labels[int(k >> 32)], int(np.int32(k & 0xFFFFFFFF))) for k in used]
        return pa.DictionaryArray.from_arrays(indices, pa.array(words, pa.string()), safe=False)  # indices < len(words)


def _with_nulls(ids: np.ndarray) -> pa.Array:
    """int32 ids as an Arrow array, null where negative: its buffers built at once, which
    pa.array(ids, mask=...) takes several times as long for."""
    valid = np.packbits(ids >= 0, bitorder="little")
    return pa.Array.from_buffers(pa.int32(), len(ids), [pa.py_buffer(valid), pa.py_buffer(ids)])


def _marker_steps(labels: list[str]) -> np.ndarray:
    """Each label's marker step: the step it names, -1 if it is no marker, -2 if it names none."""
    steps = []
    for label in labels:
        parsed = parse_marker(label)
        steps.append(parsed[1] if parsed is not None else -2 if label.startswith(MARKER_PREFIX) else -1)
    return np.array(steps, dtype=np.int64)


class NativeCudaBackend(NativeColumns, CudaBackend):
    """CudaBackend whose events come from the tracker module `tracker` (see load())."""

    capture_path = "native"

    def __init__(self, tracker, device=None, stacks: bool = True, max_entries: int = 1_000_000):
        super().__init__(device=device, stacks=stacks, max_entries=max_entries)
        self._take_tracker(tracker)
        self._last_segments: list = []
        self._counters = getattr(tracker, "device_counters", None)  # absent where built without CUDA

    # -- lifecycle ------------------------------------------------------------------
    def start(self) -> dict:
        with torch.cuda.device(self.device):
            torch.cuda.init()
            self.tracker.attach()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.set_tag("")
            stats = torch._C._cuda_memoryStats(self.index)
            self._allocs_at_start = _all(stats, "allocation", "allocated")
            self.tracker.start(self.index, self.stacks, _MAX_DEPTH)
            snap = torch._C._cuda_memorySnapshot(None)
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
        )

    def stop(self) -> None:
        self.tracker.stop()
        self.set_tag("")

    def pause_stacks(self, paused: bool) -> None:
        pass  # reading frames never takes the GIL, and autograd's thread has none to read

    def stats_row(self) -> dict:
        """CudaBackend's row from the tracker's direct read of the same counters."""
        if self._counters is None:
            return super().stats_row()
        c = self._counters(self.index)
        return dict(zip(_COUNTER_NAMES, c[:8]))

    # -- draining -------------------------------------------------------------------
    def drain(self, step: int, with_segments: bool = False) -> dict | None:
        if with_segments:
            self._last_segments = torch._C._cuda_memorySnapshot(None)["segments"]
        got = self.tracker.drain()
        if self._counters is not None:
            made = int(self._counters(self.index)[8])
        else:
            made = _all(torch._C._cuda_memoryStats(self.index), "allocation", "allocated")
        expected = made - self._allocs_at_start
        self.dropped = max(self.dropped, expected - int(got["allocs"]))
        return self._columns(got, step)


def make_native_backend(device=None, stacks: bool = True, max_entries: int = 1_000_000):
    """(NativeCudaBackend or None, why not): None where the tracker cannot be built,
    or stacks are asked for and this build cannot read Python frames."""
    from profiler.capture import native

    tracker, error = native.load(cuda=True)
    if tracker is None:
        return None, error
    if stacks and not getattr(tracker, "reads_frames", False):
        return None, "the tracker cannot read Python frames here (needs Python 3.11 to 3.13)"
    return NativeCudaBackend(tracker, device=device, stacks=stacks, max_entries=max_entries), None
