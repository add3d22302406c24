"""The capture session: `profiler.profile(...)`, `prof.step()`, `profiler.mark(...)`.

One session owns a backend (CUDA allocator history or CPU storage tracking),
the module tracer, and a writer. It decides when a step ends (an optimizer
step, or `prof.step()` once a script calls it), drains events there, and
records phases, roles (parameters, gradients, optimizer states) and counters.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
import sys
import time

import torch

from profiler.capture import distributed
from profiler.capture.fsdp import FsdpInstrumentation
from profiler.capture.modules import ModuleTracer
from profiler.capture.roles import named_grads, named_states, tensor_roles
from profiler.trace.schema import Phase, SnapshotKind, Status
from profiler.trace.writer import TraceWriter

_ACTIVE: "Profiler | None" = None
_DIST_CAPTURES = itertools.count()  # this process's captures under torchrun, numbered
_OPT = Phase.OPTIMIZER.value
_BWD = Phase.BACKWARD.value


def _now_us() -> int:
    return time.time_ns() // 1000


class Profiler:
    """Context manager and decorator. See `profile()` for the arguments."""

    def __init__(self, out="traces", name=None, config=None, backend="auto", stacks=True,
                 modules=True, hooked_steps=(3, 50), max_entries=1_000_000, drain_interval_s=0.5,
                 run_id=None, subdir=None, extra_meta=None, explicit_steps=False):
        self.out = out
        self.name = name or "run"
        self.config = dict(config or {})
        self.backend_name = backend
        self.stacks = stacks
        self.modules = modules
        # (first, every): module hooks run in the first `first` steps and every
        # `every`-th step after; other steps borrow attribution from an identical
        # hooked step (profiler/trace/finalize/templates.py). None hooks every step.
        self.hooked_steps = hooked_steps
        self.max_entries = max_entries
        self.drain_interval_s = drain_interval_s
        self.run_id = run_id
        self.subdir = subdir
        self.extra_meta = dict(extra_meta or {})
        # True: steps end only at prof.step() (a framework's own step end), never
        # at an optimizer step.
        self.explicit_steps = explicit_steps
        self.writer: TraceWriter | None = None
        self.run_dir = None
        self.phase: str | None = None
        self.step_index = 0
        self._reset_state()

    def _reset_state(self):
        self._phase_start = 0
        self._explicit_steps = getattr(self, "explicit_steps", False)
        self._last_boundary_auto = False
        self._events_since_boundary = 0
        self._last_drain = time.perf_counter()
        self._optimizers: list = []
        self._handles: list = []
        self._patched_backward = None
        self._oom_info = None
        self._param_names: dict[int, str] = {}  # id(param) -> qualified name
        self._capture_s = 0.0  # host time spent in our own step-boundary work
        self._rows: dict[str, list] = {}  # small tables, buffered until the next drain
        self._role_cols: list[dict] = []
        self._known_states: dict[str, int] = {}

    # -- public API -----------------------------------------------------------------
    def __enter__(self):
        global _ACTIVE
        if _ACTIVE is not None:
            raise RuntimeError("a vramscope capture is already active in this process")
        # Locals, not attributes: a Profiler entered again starts a run of its own.
        run_id, subdir, extra_meta = self.run_id, self.subdir, dict(self.extra_meta)
        rank = distributed.rank_from_env() if subdir is None else None
        if rank is not None:  # one partition of a shared run directory per rank
            run_id = run_id or distributed.shared_run_id(self.name, rank, nth=next(_DIST_CAPTURES))
            subdir = rank.partition
            extra_meta = {**rank.meta(), **extra_meta}
            self.config.setdefault("world_size", rank.world_size)
        # The process group's backend is known only once the script made it, and it may be
        # gone again by the end (destroy_process_group): look at step boundaries.
        self._awaiting_dist_facts = rank is not None
        self.backend = _make_backend(self.backend_name, self.stacks, self.max_entries,
                                     device=distributed.device_index(rank))
        facts = self.backend.start()
        meta = dict(backend=self.backend.name, torch_version=torch.__version__, config=self.config,
                    max_allocated_bytes=None, max_reserved_bytes=None, events_dropped=0,
                    capture=dict(stacks=self.stacks, modules=self.modules,
                                 hooked_steps=self.hooked_steps,
                                 max_entries=self.max_entries),
                    **facts, **extra_meta)
        meta.setdefault("allocator_settings", None)
        meta["alloc_conf_env"] = os.environ.get("PYTORCH_CUDA_ALLOC_CONF") or \
            os.environ.get("PYTORCH_ALLOC_CONF")
        self.writer = TraceWriter(self.out, self.name, meta, run_id=run_id, subdir=subdir)
        self.run_dir = self.writer.run_dir
        start = getattr(self.backend, "start_segments", None)
        if start:
            self.writer.append("segments", start)
        self.tracer = ModuleTracer(self, self.backend.set_tag, self.backend.get_tag)
        self._hooks_on = False
        self._set_module_hooks(self.modules)
        self._install_optimizer_hooks()
        self._patch_backward()
        self._fsdp = FsdpInstrumentation(self)
        self._fsdp.install()
        if self.backend.name == "cuda":
            from profiler.capture import cuda
            cuda.on_oom(self._on_oom)
        _ACTIVE = self
        return self

    def __exit__(self, exc_type, exc, tb):
        global _ACTIVE
        _ACTIVE = None
        if exc_type is not None and issubclass(exc_type, torch.OutOfMemoryError):
            status = Status.OOM.value
        elif exc_type is not None and not _is_clean_exit(exc_type, exc):
            status = Status.ERROR.value
        else:
            status = Status.COMPLETE.value
        try:
            self._teardown()
            self._finish(status, exc)
        except Exception as e:  # never let our failure replace the user's outcome
            print(f"vramscope: warning: the trace could not be finalized ({type(e).__name__}: {e}); "
                  f"its journals are kept in {self.run_dir} and still load", file=sys.stderr)
            try:
                self.writer.flush({"status": status, "finalize_error": f"{type(e).__name__}: {e}"})
            except Exception:
                pass
        return False  # never swallow the user's exception

    def __call__(self, fn):
        """Decorator form: each call of `fn` is one capture."""
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            with Profiler(**self._init_kwargs()):
                return fn(*args, **kwargs)
        return wrapper

    def _init_kwargs(self):
        return dict(out=self.out, name=self.name, config=self.config, backend=self.backend_name,
                    stacks=self.stacks, modules=self.modules, hooked_steps=self.hooked_steps, max_entries=self.max_entries,
                    drain_interval_s=self.drain_interval_s,
                    extra_meta=self.extra_meta, explicit_steps=self.explicit_steps)

    def step(self) -> None:
        """Mark the end of a step. Once called, optimizer steps no longer end steps."""
        if not self._explicit_steps:
            self._explicit_steps = True
            if self._last_boundary_auto and self._events_since_boundary == 0:
                return  # the optimizer hook already ended this step
        self._boundary()

    def register_model(self, model) -> str:
        """Name `model`'s modules and register its parameters now.

        Module hooks do this on a model's first forward; a compiled model runs no
        module hooks, so call this to keep its names and parameter category.
        """
        return self.tracer.register_root(model)

    def update_meta(self, fields: dict) -> None:
        """Add run-level facts to meta.json (written at the next drain and at the end)."""
        self.writer.meta.update(fields)

    def mark(self, phase: str) -> None:
        """Start a user-defined phase (until the next mark, forward, or step)."""
        self.enter_phase(phase)
        self.tracer.retag()

    # -- phases and steps (called by the tracer and hooks) ----------------------------
    def enter_phase(self, phase: str | None) -> None:
        if phase == self.phase:
            return
        now = _now_us()
        if self.phase is not None:
            self._buffer("phases", step=self.step_index, phase=self.phase,
                         ts_us_start=self._phase_start, ts_us_end=now)
        self.phase = phase
        self._phase_start = now

    def on_new_root(self, module, root_name, prefix) -> None:
        # Parameters usually pre-date the capture: name their storages, at a position
        # in the stream that is exact (a marker on CUDA, the event count on CPU).
        self.backend.adopt(module)
        pos = self._position()
        named = [(prefix + n, p) for n, p in module.named_parameters(remove_duplicate=True)]
        for n, p in named:
            self._param_names.setdefault(id(p), n)
        dev = self.backend.name
        self._buffer_roles(tensor_roles(named, "parameter", dev, pos, self.step_index))
        buffers = ((prefix + n, b) for n, b in module.named_buffers(remove_duplicate=True))
        self._buffer_roles(tensor_roles(buffers, "buffer", dev, pos, self.step_index))
        self.tracer.retag()

    def on_new_module(self, module, name, parent, depth) -> None:
        params = list(module.parameters(recurse=False))
        buffers = list(module.buffers(recurse=False))
        self._buffer("modules", module=name, parent=parent, class_name=type(module).__name__,
                     depth=depth, param_bytes=sum(p.numel() * p.element_size() for p in params),
                     buffer_bytes=sum(b.numel() * b.element_size() for b in buffers),
                     param_count=sum(p.numel() for p in params))

    def on_root_exit(self) -> None:
        # Inference loops may never step: drain on a timer so the ring never fills.
        if time.perf_counter() - self._last_drain > self.drain_interval_s:
            t0 = time.perf_counter()
            self._drain()
            self._capture_s += time.perf_counter() - t0

    # -- steps ------------------------------------------------------------------------
    def _boundary(self, auto=False) -> int:
        """End the current step; returns the stream position of the boundary."""
        t0 = time.perf_counter()
        if self._awaiting_dist_facts:
            facts = distributed.late_facts()
            if facts:
                self.writer.meta.update(facts)
                self._awaiting_dist_facts = False
        row = dict(step=self.step_index, ts_us=_now_us(), modules_hooked=self._hooks_on,
                   **self.backend.stats_row())
        self.enter_phase(None)
        if self.backend.name == "cuda":
            self.step_index += 1
            pos = self.backend.mark(self.step_index)
        else:  # CPU events are ours: draining is cheap and gives exact steps directly
            self._drain()
            self.step_index += 1
            pos = self.backend.events_seen
        row.update(events_seen=self.backend.events_seen, events_dropped=self.backend.dropped)
        self._buffer("steps", **row)
        self._set_module_hooks(self.modules and self._hook_step(self.step_index))
        self._last_boundary_auto = auto
        self._events_since_boundary = 0
        self.tracer.retag()
        if self.backend.name != "cuda" or time.perf_counter() - self._last_drain > self.drain_interval_s:
            self._drain()
        self._capture_s += time.perf_counter() - t0
        return pos

    def _hook_step(self, step: int) -> bool:
        if self.hooked_steps is None:
            return True
        first, every = self.hooked_steps
        return step < first or (every and step % every == 0)

    def _set_module_hooks(self, on: bool) -> None:
        if on and not self._hooks_on:
            self.tracer.install()
        elif self._hooks_on and not on:
            self.tracer.remove()
        self._hooks_on = on

    def _position(self) -> int:
        """An exact stream position for roles registered now (see profiler.trace.finalize.markers)."""
        if self.backend.name == "cuda":
            return self.backend.mark(self.step_index)
        self._drain(flush=False)
        return self.backend.events_seen

    # -- buffering and draining ---------------------------------------------------------
    def _buffer(self, table: str, **row) -> None:
        self._rows.setdefault(table, []).append(row)

    def _buffer_roles(self, cols: dict | None) -> None:
        if cols:
            self._role_cols.append(cols)

    def _drain(self, with_segments: bool = False, flush: bool = True) -> None:
        """Move new allocator events and buffered rows to the writer; flush the journals."""
        cols = self.backend.drain(self.step_index, with_segments)
        self._last_drain = time.perf_counter()
        if cols:
            self._events_since_boundary += len(cols["ts_us"])
            self.writer.append("events", cols)
        self._push_rows()
        if flush:
            self.writer.flush(self._live_meta())

    def _push_rows(self) -> None:
        frames, stacks = self.backend.interner.take_new()
        if frames:
            self.writer.append("frames", frames)
        if stacks:
            self.writer.append("stacks", stacks)
        for table, rows in self._rows.items():
            if rows:
                self.writer.append(table, {k: [r.get(k) for r in rows] for k in rows[0]})
        self._rows = {}
        for cols in self._role_cols:
            self.writer.append("roles", cols)
        self._role_cols = []

    def _live_meta(self) -> dict:
        return dict(events_dropped=self.backend.dropped, steps_completed=self.step_index,
                    capture_host_s=round(self._capture_s, 6), **self.backend.peaks())

    # -- optimizer and backward hooks --------------------------------------------------
    def _install_optimizer_hooks(self) -> None:
        from torch.optim.optimizer import (register_optimizer_step_post_hook,
                                           register_optimizer_step_pre_hook)
        self._handles += [register_optimizer_step_pre_hook(self._opt_pre),
                          register_optimizer_step_post_hook(self._opt_post)]

    def _opt_pre(self, optimizer, args, kwargs):
        self.enter_phase(_OPT)
        self.tracer.retag()

    def _opt_post(self, optimizer, args, kwargs):
        t0 = time.perf_counter()
        step = self.step_index
        if not self._explicit_steps:
            pos = self._boundary(auto=True)
        else:
            pos = self._position()
            self.enter_phase(None)
            self.tracer.retag()
        # Gradients and states are alive right now, at the boundary's position.
        names, dev = self._param_names, self.backend.name
        self._buffer_roles(tensor_roles(named_grads(optimizer, names), "gradient", dev, pos, step))
        self._buffer_roles(tensor_roles(named_states(optimizer, names), "optimizer_state", dev,
                                        pos, step, known=self._known_states))
        self._capture_s += time.perf_counter() - t0

    def _patch_backward(self) -> None:
        original = torch.autograd.backward
        session = self

        @functools.wraps(original)
        def backward(tensors, *args, **kwargs):
            session.enter_phase(_BWD)
            tag = session.tracer.tag(_BWD, None)
            session.backend.set_tag(tag)
            roots = [tensors] if isinstance(tensors, torch.Tensor) else list(tensors or ())
            # Work before the first module's backward (a loss computed outside any
            # module) runs on autograd's thread: stamp it there.
            for t in roots:
                fn = t.grad_fn if isinstance(t, torch.Tensor) else None
                if fn is not None:
                    fn.register_prehook(session.tracer.loss_hook())
            session.backend.pause_stacks(True)
            try:
                return original(tensors, *args, **kwargs)
            finally:
                session.backend.pause_stacks(False)

        self._patched_backward = original
        torch.autograd.backward = backward

    # -- OOM --------------------------------------------------------------------------
    def _on_oom(self, device, alloc_bytes, device_allocated, device_free) -> None:
        self._oom_info = dict(device=int(device), requested_bytes=int(alloc_bytes),
                              device_allocated_bytes=int(device_allocated),
                              device_free_bytes=int(device_free), step=self.step_index)
        try:
            self._drain(with_segments=True)
            segs = self.backend.segments_now(SnapshotKind.OOM.value, _now_us(),
                                             self.backend.events_seen)
            if segs:
                self.writer.append("segments", segs)
            self.writer.flush(dict(self._live_meta(), oom=self._oom_info))
        except Exception as e:  # the user's OOM error matters more than ours
            self._oom_info["capture_error"] = repr(e)

    # -- teardown ---------------------------------------------------------------------
    def _teardown(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        if self._patched_backward is not None:
            torch.autograd.backward = self._patched_backward
            self._patched_backward = None
        self._set_module_hooks(False)
        self._fsdp.remove()
        if self.backend.name == "cuda":
            from profiler.capture import cuda
            cuda.clear_oom()

    def _finish(self, status: str, exc) -> None:
        self._drain(with_segments=True, flush=False)
        if self._events_since_boundary or self.step_index == 0:
            self._buffer("steps", step=self.step_index, ts_us=_now_us(), modules_hooked=self._hooks_on,
                         events_seen=self.backend.events_seen, events_dropped=self.backend.dropped,
                         **self.backend.stats_row())
        self.enter_phase(None)
        segs = self.backend.segments_now(SnapshotKind.END.value, _now_us(),
                                         self.backend.events_seen)
        if segs:
            self.writer.append("segments", segs)
        self._push_rows()
        self.backend.stop()
        final = self._live_meta()
        final.update(events_seen=self.backend.events_seen, **distributed.late_facts())
        if self._oom_info:
            final["oom"] = self._oom_info
        if exc is not None and status != Status.COMPLETE.value:
            final["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        self.writer.finalize(status, final)


def _is_clean_exit(exc_type, exc) -> bool:
    return issubclass(exc_type, SystemExit) and exc.code in (0, None)


def _make_backend(name: str, stacks: bool, max_entries: int, device: int | None = None):
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        from profiler.capture.cuda import CudaBackend
        # device: a rank's own GPU (LOCAL_RANK), which the script may not have selected yet.
        return CudaBackend(device=device, stacks=stacks, max_entries=max_entries)
    if name == "cpu":
        from profiler.capture.cpu import CpuBackend
        return CpuBackend(stacks=stacks)
    raise ValueError(f"unknown backend {name!r}: expected auto, cuda or cpu")


# -- module-level API -----------------------------------------------------------------

def profile(out="traces", name=None, config=None, *, backend="auto", stacks=True, modules=True,
            hooked_steps=(3, 50), max_entries=1_000_000, drain_interval_s=0.5,
            explicit_steps=False, **kw) -> Profiler:
    """Capture memory events into a trace directory under `out`.

    `name` labels the run, `config` records what the run toggled (shown in
    comparisons). `backend` is "auto" (CUDA when available), "cuda" or "cpu".
    `stacks` records Python stacks for allocations; `modules=False` skips module
    hooks (cheaper; allocations then carry phases but no module). `hooked_steps=(first,
    every)` runs module hooks in the first steps and every `every`-th step; the
    other steps take their modules from an identical hooked step (None: every step). Use as `with profile(...) as prof:`
    (call `prof.step()` per step if the script has no optimizer) or as a decorator.
    """
    return Profiler(out=out, name=name, config=config, backend=backend, stacks=stacks,
                    modules=modules, hooked_steps=hooked_steps, max_entries=max_entries,
                    drain_interval_s=drain_interval_s, explicit_steps=explicit_steps, **kw)


def active() -> Profiler | None:
    return _ACTIVE


def mark(phase: str) -> None:
    """Start a user-defined phase in the active capture (a no-op without one)."""
    if _ACTIVE is not None:
        _ACTIVE.mark(phase)


def step() -> None:
    if _ACTIVE is not None:
        _ACTIVE.step()


def register_model(model) -> str | None:
    """See Profiler.register_model (a no-op without an active capture)."""
    return _ACTIVE.register_model(model) if _ACTIVE is not None else None


def record_kv(cache, name: str | None = None) -> dict | None:
    """Record a KV cache's state now (tokens, token-state and reserved bytes).

    `cache` follows the KV protocol (a `kv_stats()` method returning a dict with
    batch, tokens, token_state_bytes, reserved_bytes and optionally extra_bytes), or
    is a transformers Cache (DynamicCache and friends), measured from its tensors.
    Returns the row, also without an active capture (so callers can test it).
    """
    from profiler.capture.kv import kv_row

    row = kv_row(cache, name)
    if _ACTIVE is not None and row is not None:
        _ACTIVE._buffer("kv", step=_ACTIVE.step_index, ts_us=_now_us(), **row)
    return row


@contextlib.contextmanager
def category(name: str):
    """Stamp allocations made inside the block with a category (e.g. "kv_cache")."""
    if _ACTIVE is None:
        yield
        return
    local = _ACTIVE.tracer.local
    previous, local.hint = local.hint, name
    _ACTIVE.tracer.retag()
    try:
        yield
    finally:
        local.hint = previous
        if _ACTIVE is not None:
            _ACTIVE.tracer.retag()
