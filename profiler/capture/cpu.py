"""CPU capture path "python", where native_cpu.py cannot run: events from tensor storages.

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

Stacks. Outside autograd's backward an allocation gets the Python stack that made
it (frames.PythonStacks). In backward it gets the forward stack of the op whose
gradient is running: each forward op names, on the autograd node of each of its
inputs (`grad_fn`), the stack that made that input's storage (op_args.note_site);
in backward, `torch._C._current_autograd_node()` is the node running, and its
noted stack is the allocation's. It goes in the same `stack_id` column, and the
phase column says it is a backward allocation. A node with none noted (a
parameter's AccumulateGrad) falls back to the Python stack, and so does
recomputation under checkpointing (grad enabled inside backward), whose Python
stack is the forward code being re-run. A view's node gets its base's stack.

The hot path (after_op) runs on every op, so it does the least Python it can
(bench/overhead_cpu.py measures it; bench/README.md lists what each change cost):
argument kinds are looked up by type instead of pytree flattening; a tensor costs
one storage lookup (no device object, no size for inputs); lists, kwargs and new
storages take slower paths; a stack frame's site is interned by (code id,
instruction); timestamps are divided into microseconds at drain time.
"""

from __future__ import annotations

import sys
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from profiler.capture.frames import PythonStacks, StackInterner
from profiler.capture.host import HostMemory
from profiler.capture.op_args import KINDS, OTHER, SITE_KEY, TENSOR, kind_of, note_site, tensors_in

_FRAME_LIMIT = 48
_PRE_EXISTING_TAG = ""  # no phase, no module, no hint
_aten = torch.ops.aten
# Ops whose input is a tensor that torch.tensor(), as_tensor() or from_numpy() just made.
_FRESH = frozenset(getattr(_aten, n) for n in ("lift_fresh", "lift_fresh_copy", "lift") if hasattr(_aten, n))


class _Tags(threading.local):
    tag = ""


class CpuBackend(HostMemory):
    """The Backend (profiler/capture/backend.py) over tensor storages."""

    capture_path = "python"  # meta.json's capture_path (native_cpu.py is "native")
    capture_path_error: str | None = None  # why the native path did not run, if it was tried

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
        self._walker = PythonStacks(self.interner, skip_prefix=__file__.rsplit("/", 2)[0], limit=_FRAME_LIMIT)

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
        facts = dict(device="cpu", allocator_settings=None, baseline_allocated_bytes=0, baseline_reserved_bytes=None)
        why = {"capture_path_error": self.capture_path_error} if self.capture_path_error else {}
        return dict(facts, capture_path=self.capture_path, **why)

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
        """Record `t`'s storage if it is new (or resized); `tag` None: the thread's tag."""
        kind = KINDS.get(type(t))
        if (kind if kind is not None else kind_of(type(t))) != TENSOR or not t.is_cpu:
            return
        try:
            st = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # sparse, nested, functional wrappers
            return
        self._track_storage(st, tag)

    def after_op(self, func, args, kwargs, out) -> None:
        """The hot path: one op ran; record storages it made, and the first use of older ones.

        Written for the common case, an op over a few tensors that allocates little:
        a tensor argument costs a storage lookup; lists, kwargs and new storages go to
        the slower paths. Inputs are never sized: a storage resized in place is an
        output (resize_, set_, out= ops return it) or goes through UntypedStorage.resize_.
        """
        live, kinds = self._live, KINDS
        grad = _grad_enabled()
        for x in args:
            kind = kinds.get(type(x))
            if kind != TENSOR:
                if kind != OTHER:  # a list, or a type not seen yet
                    self._inputs(func, (x,), grad)
                continue
            try:
                st = x.untyped_storage()
            except (RuntimeError, NotImplementedError):  # sparse, nested
                continue
            rec = live.get(id(st))
            if rec is None or rec[0]() is not st:
                self._first_use(func, x, st)
            elif grad:
                fn = x.grad_fn
                if fn is not None and rec[3] is not None:
                    note_site(fn, rec[3])
        if kwargs:
            self._inputs(func, kwargs.values(), grad)
        kind = kinds.get(type(out))
        if kind == TENSOR:
            self._output(out)
        elif kind != OTHER:
            for x in tensors_in((out,), None):
                self._output(x)

    def _inputs(self, func, values, grad: bool) -> None:
        for x in tensors_in(values, None):
            try:
                st = x.untyped_storage()
            except (RuntimeError, NotImplementedError):
                continue
            rec = self._live.get(id(st))
            if rec is None or rec[0]() is not st:
                self._first_use(func, x, st)
            elif grad and x.grad_fn is not None:
                note_site(x.grad_fn, rec[3])

    def _first_use(self, func, x, st) -> None:
        """A storage first seen as an op's input: made before the capture (pre-existing
        state), or by torch.tensor() and kin just now (lift_fresh: the thread's tag)."""
        if x.is_cpu:
            self._track_storage(st, None if func.overloadpacket in _FRESH else _PRE_EXISTING_TAG)

    def _output(self, x) -> None:
        try:
            st = x.untyped_storage()
        except (RuntimeError, NotImplementedError):
            return
        rec = self._live.get(id(st))
        if (rec is None or rec[0]() is not st or rec[2] != st.nbytes()) and x.is_cpu:
            self._track_storage(st)

    def note_backward_roots(self, roots) -> None:
        """Give the roots of a backward the forward stack of their storages: no later
        forward op reads a loss, so its autograd node is not named by after_op."""
        for t in roots:
            fn = getattr(t, "grad_fn", None)
            if fn is None or not isinstance(t, torch.Tensor) or not t.is_cpu:
                continue
            rec = self._live.get(id(t.untyped_storage()))
            if rec is not None:
                note_site(fn, rec[3])

    def _track_storage(self, st, tag: str | None = None) -> None:
        size = st.nbytes()
        key = id(st)
        rec = self._live.get(key)
        if rec is not None and rec[0]() is st:
            if rec[2] != size:
                self._resized(st, rec, size)
            return
        if size == 0:
            return
        addr = st.data_ptr()
        if tag is None:
            tag = self._tags.tag
        stack = self._stack() if self.stacks else None
        with self._lock:
            rec = [None, addr, size, stack]
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
        self._events.append((time.time_ns(), "alloc", addr, size, tag, stack))

    def _free_locked(self, addr, size, tag) -> None:
        self.allocated -= size
        ts = time.time_ns()
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
        """The stack of an allocation being made: in autograd's backward, the forward stack
        of the op whose node runs (after_op noted it); else the Python stack."""
        node: Any = _current_node()  # a Node: its `metadata` is a dict
        if node is not None and not _grad_enabled():  # grad on in backward: recompute
            sid = node.metadata.get(SITE_KEY)
            if sid is not None:
                return sid
        return self._walker.stack_id(sys._getframe(2))

    # -- draining -------------------------------------------------------------------
    def drain(self, step: int, with_segments: bool = False) -> dict | None:
        with self._lock:
            ev, self._events = self._events, []
            self.events_seen += len(ev)
        if not ev:
            return None
        return {
            "ts_us": [e[0] // 1000 for e in ev],
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


_grad_enabled = torch.is_grad_enabled
_current_node = torch._C._current_autograd_node


def _dtensor_class():
    try:
        from torch.distributed.tensor import DTensor

        return DTensor
    except Exception:  # noqa: BLE001 - a build without distributed
        return None


_DTENSOR = _dtensor_class()
_UNWRAPS: dict[tuple, bool] = {}  # an op's `types` -> whether one is a DTensor


class _StorageMode(TorchDispatchMode):
    def __init__(self, backend: CpuBackend):
        super().__init__()
        self.backend = backend
        self.after_op = backend.after_op

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        # A DTensor (FSDP2's shards) owns no storage: let it unwrap, and see the ops
        # on its local tensors, which come back through this mode. Other subclasses
        # (fake tensors among them) run here, and only plain tensors are tracked.
        unwraps = _UNWRAPS.get(types)
        if unwraps is None:
            unwraps = _UNWRAPS[types] = _DTENSOR is not None and any(issubclass(t, _DTENSOR) for t in types)
        if unwraps:
            return NotImplemented
        # The C++ overload itself: OpOverload.__call__ is one more Python frame per op.
        out = func._op(*args, **kwargs) if kwargs else func._op(*args)
        if self.backend.failure is None:
            try:
                self.after_op(func, args, kwargs, out)
            except Exception as e:  # noqa: BLE001 - ours: recording stops, the op's result stands
                self.backend.failure = e  # the session stops the capture at its next drain
        return out
