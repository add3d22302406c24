"""CPU backend: the same events, from tensor storages instead of an allocator.

A TorchDispatchMode sees every op's inputs and outputs. A storage seen for the
first time is an "alloc" (its bytes, the thread's current tag), and a weakref
callback on the storage records its free, as the CUDA allocator would: a
"free_requested" then a "free_completed" with the same time, address, size and
tag (allocated bytes drop at the first, active bytes at the second; with no
streams on CPU they drop together). Sizes are exact storage bytes: there is
no caching allocator, so reserved and segment columns stay null.

Storages that pre-date the capture (first seen as an op's input) are recorded
when first seen, with no phase and no module, like the CUDA backend's
baseline blocks. Parameters and buffers are recorded the first time their
module is called, before the module tracer registers their roles, so that
they classify as parameters rather than as the first op's activations.

The online counters (`allocated`, `peak`) are exactly the replay of the event
stream: + size at each alloc, - size at each free_requested.
"""

from __future__ import annotations

import sys
import threading
import time
import weakref
from collections.abc import Callable
from types import FrameType
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from profiler.capture.frames import StackInterner

_FRAME_LIMIT = 48
_PRE_EXISTING_TAG = ""  # no phase, no module, no hint
_aten = torch.ops.aten
# Ops whose input is a tensor that torch.tensor(), as_tensor() or from_numpy() just made.
_FRESH = frozenset(getattr(_aten, n) for n in ("lift_fresh", "lift_fresh_copy", "lift") if hasattr(_aten, n))


class _Tags(threading.local):
    tag = ""


class CpuBackend:
    """The Backend (profiler/capture/backend.py) over tensor storages."""

    name = "cpu"
    # The events are this backend's own list: draining is cheap, and the count of
    # drained events is an exact position.
    drain_every_step = True
    positions_need_drain = True
    start_segments: dict | None = None  # no allocator, no segments

    def __init__(self, device=None, stacks: bool = True, max_entries: int = 0):
        self.device_type = "cpu"
        self.stacks = stacks
        self.interner = StackInterner()
        self._tags = _Tags()
        # id(storage) -> [weakref, addr, size]; a storage's id is not reused while it lives.
        self._live: dict[int, list] = {}
        self._events: list[tuple] = []
        self.events_seen = 0
        self.dropped = 0
        self.allocated = 0
        self.peak = 0
        self.failure: Exception | None = None  # an error of ours while tracking: nothing more is recorded
        # Re-entrant: a weakref callback can run inside the locked section of its own
        # thread (a garbage collection triggered by an allocation there).
        self._lock = threading.RLock()
        self._mode = _StorageMode(self)
        # id(module) -> weakref, for modules whose parameters and buffers are recorded.
        self._modules_seen: dict[int, weakref.ref] = {}
        self._module_hook = None
        self._saved_resize: Callable[..., Any] | None = None
        self._own_dir = __file__.rsplit("/", 2)[0]

    def set_tag(self, tag: str) -> None:
        self._tags.tag = tag

    def get_tag(self) -> str:
        return self._tags.tag

    def pause_stacks(self, paused: bool) -> None:
        pass  # CPU backward runs on the calling thread: its stacks are informative

    def attribute_compiled(self, tags) -> None:
        pass  # dynamo does not compile under this backend's dispatch mode: compiled models run eagerly

    # -- lifecycle ------------------------------------------------------------------
    def start(self) -> dict:
        self._mode.__enter__()
        self._patch_storage_resize()
        return dict(device="cpu", allocator_settings=None, baseline_allocated_bytes=0, baseline_reserved_bytes=None)

    def stop(self) -> None:
        self._mode.__exit__(None, None, None)
        if self._saved_resize is not None:
            torch.UntypedStorage.resize_ = self._saved_resize  # type: ignore[method-assign]
            self._saved_resize = None
        self._modules_seen = {}
        with self._lock:
            # Storages that die after the capture record nothing: drop their weakrefs.
            self._live = {}

    # -- tracking ---------------------------------------------------------------------
    def track(self, t: torch.Tensor, tag: str | None = None) -> None:
        if t.device.type != self.device_type or t.is_meta or not _is_plain(type(t)):
            return
        try:
            st = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # sparse, nested, functional wrappers
            return
        self._track_storage(st, tag)

    def _track_storage(self, st, tag: str | None = None) -> None:
        size = st.nbytes()
        key = id(st)
        rec = self._live.get(key)
        if rec is not None and rec[0]() is st:
            if rec[2] == size:
                return
            self._resized(st, rec, size)
            return
        if size == 0:
            return
        addr = st.data_ptr()
        if tag is None:
            tag = self._tags.tag
        stack = self._stack() if self.stacks else None
        with self._lock:
            rec = [None, addr, size]
            rec[0] = weakref.ref(st, self._freed_callback(key, rec))
            self._live[key] = rec
            self._alloc_locked(addr, size, tag, stack)

    def _patch_storage_resize(self) -> None:
        # Storage.resize_ is no dispatched op, and FSDP frees and re-allocates
        # unsharded parameters with it: seen here, a resize is a free and an alloc now.
        original = torch.UntypedStorage.resize_
        backend = self

        def resize_(storage, size):
            out = original(storage, size)
            if storage.device.type == backend.device_type:
                backend._track_storage(storage)
            return out

        self._saved_resize = original
        torch.UntypedStorage.resize_ = resize_  # type: ignore[method-assign]  # patched for the capture only

    def _alloc_locked(self, addr, size, tag, stack) -> None:
        self.allocated += size
        if self.allocated > self.peak:
            self.peak = self.allocated
        self._events.append((time.time_ns() // 1000, "alloc", addr, size, tag, stack))

    def _free_locked(self, addr, size, tag) -> None:
        self.allocated -= size
        ts = time.time_ns() // 1000
        self._events.extend(
            ((ts, "free_requested", addr, size, tag, None), (ts, "free_completed", addr, size, tag, None))
        )

    def _resized(self, st, rec, size) -> None:
        """A storage resized in place (resize_, out= ops): a free of the old block, an alloc
        of the new, both stamped with the thread's tag (this op made the new block)."""
        tag = self._tags.tag
        stack = self._stack() if self.stacks else None
        with self._lock:
            if rec[2]:
                self._free_locked(rec[1], rec[2], tag)
            rec[1], rec[2] = st.data_ptr(), size
            if size:
                self._alloc_locked(rec[1], size, tag, stack)

    def _freed_callback(self, key, rec):
        def freed(_ref):
            tag = self._tags.tag
            with self._lock:
                live = self._live.get(key)
                if live is rec:
                    del self._live[key]
                if rec[2]:
                    self._free_locked(rec[1], rec[2], tag)

        return freed

    def adopt(self, module) -> None:
        """Record a new root's parameters and buffers, which pre-date the capture.

        The session calls this when it meets a root module, before naming the roles.
        """
        self._on_module_call(module, ())

    def _on_module_call(self, module, args):
        """The first call of a module records its parameters and buffers, pre-existing state."""
        seen = self._modules_seen
        ref = seen.get(id(module))
        if ref is not None and ref() is module:
            return None
        for sub in module.modules():
            # A module made per call (built inside forward) must not pile up here.
            seen[id(sub)] = weakref.ref(sub, lambda _r, k=id(sub): seen.pop(k, None))  # noqa: B008 (binds this id)
        for t in module.parameters():
            # FSDP2's parameters are DTensors: their local shards are the storage.
            self.track(getattr(t, "_local_tensor", t), _PRE_EXISTING_TAG)
        for t in module.buffers():
            self.track(t, _PRE_EXISTING_TAG)
        return None

    def _stack(self) -> int | None:
        intern = self.interner
        f: FrameType | None = sys._getframe(3)
        ids: list[int] = []
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
            self.events_seen += len(ev)
        if not ev:
            return None
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
        with self._lock:
            return dict(allocated_bytes=self.allocated, active_bytes=self.allocated, max_allocated_bytes=self.peak)

    def peaks(self) -> dict:
        return dict(max_allocated_bytes=self.peak, max_reserved_bytes=None)

    def segments_now(self, kind, ts_us, event_index):
        return None  # no allocator, no segments

    def position(self, step: int) -> int:
        """The count of drained events: exact once the caller has drained."""
        return self.events_seen

    def install_oom_observer(self, callback) -> None:
        pass  # host memory has no allocator observer

    def remove_oom_observer(self) -> None:
        pass


def _is_plain(cls) -> bool:
    return cls.__torch_dispatch__ is _PLAIN_DISPATCH


def _dtensor_class():
    try:
        from torch.distributed.tensor import DTensor

        return DTensor
    except Exception:  # noqa: BLE001 - a build without distributed
        return None


_PLAIN_DISPATCH = torch.Tensor.__torch_dispatch__
_DTENSOR = _dtensor_class()


class _StorageMode(TorchDispatchMode):
    def __init__(self, backend: CpuBackend):
        super().__init__()
        self.backend = backend

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        # A DTensor (FSDP2's shards) owns no storage: let it unwrap, and see the ops
        # on its local tensors, which come back through this mode. Other subclasses
        # (fake tensors among them) run here, and only plain tensors are tracked.
        if _DTENSOR is not None and any(issubclass(t, _DTENSOR) for t in types):
            return NotImplemented
        out = func(*args, **(kwargs or {}))
        if self.backend.failure is None:
            try:
                self._track(func, args, kwargs, out)
            except Exception as e:  # noqa: BLE001 - ours: recording stops, the op's result stands
                self.backend.failure = e  # the session stops the capture at its next drain
        return out

    def _track(self, func, args, kwargs, out) -> None:
        track = self.backend.track
        # Inputs first: a storage made before capture is "allocated" when first used,
        # as pre-existing state (no phase, no module), not as this op's output. The
        # exception is lift_fresh, whose input was just made by torch.tensor() and kin.
        tag = None if func.overloadpacket in _FRESH else _PRE_EXISTING_TAG
        for x in tree_flatten((args, kwargs))[0]:
            if isinstance(x, torch.Tensor):
                track(x, tag)
        for x in tree_flatten(out)[0]:
            if isinstance(x, torch.Tensor):
                track(x)
