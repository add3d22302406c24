"""CPU backend: the same events, from tensor storages instead of an allocator.

A TorchDispatchMode sees every op's inputs and outputs. A storage seen for the
first time is an "alloc" (its bytes, the thread's current tag), and a weakref
callback on the storage records its "free_completed". Storages that pre-date
the capture are recorded when first seen. Sizes are exact storage bytes:
there is no caching allocator, so reserved and segment columns stay null.
"""

from __future__ import annotations

import sys
import threading
import time
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from profiler.capture.frames import StackInterner

_FRAME_LIMIT = 48


class _Tags(threading.local):
    tag = ""


class CpuBackend:
    name = "cpu"

    def __init__(self, device=None, stacks: bool = True, max_entries: int = 0):
        self.device_type = "cpu"
        self.stacks = stacks
        self.interner = StackInterner()
        self._tags = _Tags()
        self._live: dict[int, tuple] = {}  # id(storage ref) -> (weakref, addr, size, tag)
        self._events: list[tuple] = []
        self.events_seen = 0
        self.dropped = 0
        self.allocated = 0
        self.peak = 0
        self._lock = threading.Lock()
        self._mode = _StorageMode(self)
        self._own_dir = __file__.rsplit("/", 2)[0]

    def set_tag(self, tag: str) -> None:
        self._tags.tag = tag

    # -- lifecycle ------------------------------------------------------------------
    def start(self) -> dict:
        self._mode.__enter__()
        return dict(device="cpu", allocator_settings=None, baseline_allocated_bytes=0,
                    baseline_reserved_bytes=None)

    def stop(self) -> None:
        self._mode.__exit__(None, None, None)

    # -- tracking ---------------------------------------------------------------------
    def track(self, t: torch.Tensor) -> None:
        if t.device.type != self.device_type or t.is_meta:
            return
        try:
            st = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # sparse, nested, functional wrappers
            return
        size = st.nbytes()
        if size == 0:
            return
        key = id(st)
        rec = self._live.get(key)
        if rec is not None and rec[0]() is st:
            return
        addr = st.data_ptr()
        tag = self._tags.tag
        ref = weakref.ref(st, self._freed_callback(key, addr, size))
        stack = self._stack() if self.stacks else None
        with self._lock:
            self._live[key] = (ref, addr, size)
            self.allocated += size
            if self.allocated > self.peak:
                self.peak = self.allocated
            self._events.append((time.time_ns() // 1000, "alloc", addr, size, tag, stack))

    def _freed_callback(self, key, addr, size):
        def freed(_ref):
            tag = self._tags.tag
            with self._lock:
                live = self._live.get(key)
                if live is not None and live[0] is _ref:
                    del self._live[key]
                self.allocated -= size
                self._events.append((time.time_ns() // 1000, "free_completed", addr, size, tag, None))
        return freed

    def _stack(self) -> int | None:
        intern = self.interner
        f = sys._getframe(3)
        ids = []
        while f is not None and len(ids) < _FRAME_LIMIT:
            code = f.f_code
            if not code.co_filename.startswith(self._own_dir):
                ids.append(intern.frame(code.co_filename, f.f_lineno, code.co_name))
            f = f.f_back
        return intern.stack(tuple(ids)) if ids else None

    # -- draining -------------------------------------------------------------------
    def drain(self, step: int, with_segments: bool = False) -> dict | None:
        with self._lock:
            ev, self._events = self._events, []
        if not ev:
            return None
        self.events_seen += len(ev)
        return {
            "ts_us": [e[0] for e in ev],
            "action": [e[1] for e in ev],
            "addr": [e[2] for e in ev],
            "size_bytes": [e[3] for e in ev],
            "stream": [0] * len(ev),
            "step": [step] * len(ev),
            "tag": [e[4] for e in ev],
            "stack_id": [e[5] for e in ev],
        }

    def stats_row(self) -> dict:
        return dict(allocated_bytes=self.allocated, active_bytes=self.allocated,
                    max_allocated_bytes=self.peak)

    def peaks(self) -> dict:
        return dict(max_allocated_bytes=self.peak, max_reserved_bytes=None)

    def segments_now(self, kind, ts_us, event_index):
        return None  # no allocator, no segments


class _StorageMode(TorchDispatchMode):
    def __init__(self, backend: CpuBackend):
        super().__init__()
        self.backend = backend

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        track = self.backend.track
        # Inputs first: a storage made before capture is "allocated" when first used.
        for x in tree_flatten((args, kwargs))[0]:
            if isinstance(x, torch.Tensor):
                track(x)
        for x in tree_flatten(out)[0]:
            if isinstance(x, torch.Tensor):
                track(x)
        return out
