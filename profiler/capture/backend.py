"""What a capture session asks of a backend, and how one is chosen.

Backends produce the same event stream: on CUDA, the caching allocator's entries
through the tracker (native_cuda.py) or torch's own history (`CudaBackend`, cuda.py);
on CPU, c10's CPU allocator reports through the tracker (native_cpu.py) or tensor
storages tracked by a dispatch mode (`CpuBackend`, cpu.py). They differ in where a
step boundary sits in the stream: the allocator's ring is costly to read, so CUDA
drops a marker into the stream and drains on a timer; CPU events are the backend's
own buffers, so draining is cheap and the number of events drained so far is an
exact position.

`Backend` is a typing.Protocol: structural, checked by type checkers only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from profiler.capture.frames import StackInterner

if TYPE_CHECKING:
    from profiler.capture.compiled import CompiledTags

BACKEND_NAMES = ("auto", "cuda", "cpu")
CAPTURE_PATHS = ("auto", "native", "python")
OomCallback = Callable[[int, int, int, int], None]  # device, requested, allocated, free


@runtime_checkable  # for tests only: the hot path never checks a backend's type
class Backend(Protocol):
    name: str
    """Recorded as meta.json's `backend`: "cuda" or "cpu"."""
    device_type: str
    """torch's device type of the tensors it tracks; roles skip tensors of other devices."""
    interner: StackInterner
    """Python stacks seen so far, handed to the writer at each drain."""
    events_seen: int
    """Events drained so far."""
    dropped: int
    """Events lost before a drain could take them (never silently)."""
    start_segments: dict | None
    """The segment map at start as writer columns, once started (None: no segments)."""
    positions_need_drain: bool
    """`position()` counts drained events: drain at every step end (draining is cheap), not
    only on the timer or when paced."""

    # Thread-local tag stamped on every allocation ("phase|module|category").
    def set_tag(self, tag: str) -> None: ...
    def get_tag(self) -> str: ...

    def start(self) -> dict:
        """Begin recording; returns run-level facts for meta.json."""

    def stop(self) -> None: ...

    def drain(self, step: int, with_segments: bool = False) -> dict | None:
        """Events since the last drain as writer columns (None when there are none);
        `with_segments` also keeps the segment map of that moment for segments_now."""

    def segments_now(self, kind: str, ts_us: int, event_index: int) -> dict | None:
        """The segment map kept by the last drain(with_segments=True), as writer columns."""

    def position(self, step: int) -> int:
        """An exact position in the event stream for roles and step ends registered now:
        a marker's id (< 0) dropped into the stream, or the count of drained events."""

    def stats_row(self) -> dict:
        """Memory counters at this moment, for the steps table."""

    def peaks(self) -> dict:
        """max_allocated_bytes and max_reserved_bytes so far, for meta.json."""

    def adopt(self, module) -> None:
        """Record a new root module's parameters and buffers, which pre-date the capture."""

    def pause_stacks(self, paused: bool) -> None:
        """Stop (or resume) gathering Python stacks, around autograd's backward."""

    def attribute_compiled(self, tags: CompiledTags) -> None:
        """Rename allocations made by torch.compile'd code from their stacks, as it drains
        (a no-op where compiled code does not run or stacks do not show its lines)."""

    def install_oom_observer(self, callback: OomCallback) -> None:
        """Call `callback` when the device runs out of memory (a no-op without allocator)."""

    def remove_oom_observer(self) -> None: ...


def make_backend(
    name: str, stacks: bool, max_entries: int, device: int | None = None, capture_path: str = "auto"
) -> Backend:
    """The backend called `name` ("auto": CUDA when a device is available).

    `capture_path` picks how events arrive: "native", the tracker (profiler/capture/native)
    fed by the CUDA caching allocator (native_cuda.py) or by c10's CPU allocator
    (native_cpu.py); or "python", torch's memory history on CUDA, the dispatch mode
    over tensor storages on CPU (cpu.py). "auto" and "native" use the tracker wherever
    it builds, else the python path, and meta.json says which ran (`capture_path`) and
    why (`capture_path_error`).
    """
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        from profiler.capture.cuda import CudaBackend

        error = None
        if capture_path != "python":
            from profiler.capture.native_cuda import make_native_backend

            native, error = make_native_backend(device=device, stacks=stacks, max_entries=max_entries)
            if native is not None:
                return native
        # device: a rank's own GPU (LOCAL_RANK), which the script may not have selected yet.
        backend = CudaBackend(device=device, stacks=stacks, max_entries=max_entries)
        backend.capture_path_error = error
        return backend
    if name == "cpu":
        from profiler.capture.cpu import CpuBackend

        error = None
        if capture_path != "python":
            from profiler.capture.native_cpu import make_native_cpu_backend

            native, error = make_native_cpu_backend(stacks=stacks)
            if native is not None:
                return native
        fallback = CpuBackend(stacks=stacks)
        fallback.capture_path_error = error
        return fallback
    raise ValueError(f"unknown backend {name!r}: expected auto, cuda or cpu")
