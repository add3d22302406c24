"""CPU backend fed by c10's default CPU allocator through the tracker (profiler/capture/native).

c10's CPU allocator reports each allocation and free to the memory reporter in the
thread's debug info, when one is there and says memory profiling is on. The tracker
(tracker.cpp, "CPU allocator reports") pushes its own on the capturing thread at start
and appends each report to the same columns as on CUDA: an allocation is an "alloc",
a free a "free_requested" then a "free_completed" with the same time, address and
size, and no stack (as on the python path). With no caching allocator, reserved and segment columns stay null.

What it sees differs from the dispatch-mode backend (cpu.py, capture_path "python"):
every block the allocator hands out, an op's internal temporaries included, and no
tensor that does not own a block of it. Blocks made before the capture are not seen,
except parameters and buffers of the modules the capture meets (adopt), recorded as
allocated then with no phase and no module, and whose later free is reported. Allocations
in OpenMP's intra-op worker threads are not reported by c10 (they do not inherit the
debug info), nor are frees made there: a block of ours freed on such a thread is freed
in the trace when its address is next allocated. A forked child (a DataLoader worker)
records nothing.

The reporter sits in the thread's profiler slot, as a profiler state that says it is
disabled: torch's profiler cannot start on the capturing thread while it is there
("Profiler is already enabled on this thread"; capture_path="python" can run under
it), and where torch's profiler already runs, make_backend takes the python path.

The tracker's counters are the replay of its events: `allocated` is + size at each
alloc and - size at each free_requested, under the lock that appends them.

Stacks are read from the allocating thread's frames without the GIL, vramscope's own
frames left out during the walk. CPU autograd runs on the calling thread: an
allocation made while a backward node runs gets the stack of the forward op that made
the node; a node without one (a parameter's AccumulateGrad, a view's node) works on
the gradient the node before it made, and takes the stack that one's allocation took
(the Python stack, the backward() call, before any). A node that runs Python (a
custom Function's backward, compiled code's) has the stack of its own frames.
"""

from __future__ import annotations

import os

import torch

from profiler.capture.frames import OWN_DIR, StackInterner
from profiler.capture.host import HostMemory
from profiler.capture.native_cuda import NativeColumns

_MAX_DEPTH = 64  # innermost Python frames kept per stack
_OWN_PREFIX = OWN_DIR + os.sep  # the walk leaves out frames of files under it


class NativeCpuBackend(HostMemory, NativeColumns):
    """The Backend (profiler/capture/backend.py) over c10's CPU allocator reports."""

    capture_path = "native"

    def __init__(self, tracker, device=None, stacks: bool = True, max_entries: int = 0):
        self.device_type = "cpu"
        self.stacks = stacks
        self.interner = StackInterner()
        self.compiled = None
        self.events_seen = 0
        self.dropped = 0  # the tracker appends every report it is handed
        self._take_tracker(tracker)

    failure: Exception | None = None  # no Python runs per op here: nothing of ours can fail there

    @property
    def allocated(self) -> int:
        """Bytes allocated now, by the events recorded so far (as CpuBackend.allocated)."""
        return int(self.tracker.cpu_counters()[0])

    @property
    def peak(self) -> int:
        return int(self.tracker.cpu_counters()[1])

    def pause_stacks(self, paused: bool) -> None:
        pass  # backward allocations take their forward op's stack; walks never take the GIL

    def attribute_compiled(self, tags) -> None:
        self.compiled = tags

    # -- lifecycle ------------------------------------------------------------------
    def start(self) -> dict:
        self.set_tag("")
        self.tracker.start_cpu(self.stacks, _MAX_DEPTH, _OWN_PREFIX)
        return dict(
            device="cpu",
            allocator_settings=None,
            baseline_allocated_bytes=0,
            baseline_reserved_bytes=None,
            capture_path=self.capture_path,
        )

    def stop(self) -> None:
        self.tracker.stop_cpu()
        self.set_tag("")

    def adopt(self, module) -> None:
        """Record a new root's parameters and buffers, which pre-date the capture; the
        tracker skips blocks it has seen allocated, and blocks of other allocators."""
        adopt = self.tracker.adopt
        for t in module.parameters():
            # FSDP2's parameters are DTensors: their local shards own the blocks.
            adopt(getattr(t, "_local_tensor", t))
        for t in module.buffers():
            if isinstance(t, torch.Tensor):
                adopt(t)

    # -- draining -------------------------------------------------------------------
    def drain(self, step: int, with_segments: bool = False) -> dict | None:
        return self._columns(self.tracker.drain(), step)

    def stats_row(self) -> dict:
        allocated, peak = self.tracker.cpu_counters()
        return dict(allocated_bytes=allocated, active_bytes=allocated, max_allocated_bytes=peak)

    def peaks(self) -> dict:
        return dict(max_allocated_bytes=self.peak, max_reserved_bytes=None)


def make_native_cpu_backend(stacks: bool = True):
    """(NativeCpuBackend or None, why not): None where the tracker cannot be built, or
    stacks are asked for and this build cannot read Python frames."""
    from profiler.capture import native

    if torch._C._autograd._profiler_enabled():
        return None, "torch's profiler is running on this thread: it holds the slot c10 reports CPU memory to"
    tracker, error = native.load(cuda=False)
    if tracker is None:
        return None, error
    if not getattr(tracker, "has_cpu", False):
        return None, "the tracker was built without the CPU allocator hook"
    if stacks and not getattr(tracker, "reads_frames", False):
        return None, "the tracker cannot read Python frames here (needs Python 3.11 to 3.13)"
    return NativeCpuBackend(tracker, stacks=stacks), None
