"""The capture session: `profiler.profile(...)`, `prof.step()`, `profiler.mark(...)`.

One session owns a backend (CUDA allocator history or CPU storage tracking),
the module tracer, and a writer. It decides when a step ends (an optimizer
step, or `prof.step()` once a script calls it), drains events there, and
records phases, roles (parameters, gradients, optimizer states) and counters.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import time

import torch

from profiler.capture.modules import ModuleTracer
from profiler.schema import Phase, SnapshotKind, Status
from profiler.writer import TraceWriter

_ACTIVE: "Profiler | None" = None
_OPT = Phase.OPTIMIZER.value
_BWD = Phase.BACKWARD.value


def _now_us() -> int:
    return time.time_ns() // 1000


class Profiler:
    """Context manager and decorator. See `profile()` for the arguments."""

    def __init__(self, out="traces", name=None, config=None, backend="auto", stacks=True,
                 max_entries=1_000_000, flush_interval_s=0.5, drain_interval_s=0.5,
                 run_id=None, subdir=None, extra_meta=None):
        self.out = out
        self.name = name or "run"
        self.config = dict(config or {})
        self.backend_name = backend
        self.stacks = stacks
        self.max_entries = max_entries
        self.flush_interval_s = flush_interval_s
        self.drain_interval_s = drain_interval_s
        self.run_id = run_id
        self.subdir = subdir
        self.extra_meta = dict(extra_meta or {})
        self.writer: TraceWriter | None = None
        self.run_dir = None
        self.phase: str | None = None
        self.step_index = 0
        self._reset_state()

    def _reset_state(self):
        self._phase_start = 0
        self._explicit_steps = False
        self._last_boundary_auto = False
        self._events_since_boundary = 0
        self._last_flush = time.perf_counter()
        self._last_drain = time.perf_counter()
        self._optimizers: list = []
        self._handles: list = []
        self._patched_backward = None
        self._oom_info = None
        self._param_names: dict[int, str] = {}  # id(param) -> qualified name
        self._capture_s = 0.0  # host time spent in our own step-boundary work
        self._known_states: dict[str, int] = {}

    # -- public API -----------------------------------------------------------------
    def __enter__(self):
        global _ACTIVE
        if _ACTIVE is not None:
            raise RuntimeError("a vramscope capture is already active in this process")
        self.backend = _make_backend(self.backend_name, self.stacks, self.max_entries)
        facts = self.backend.start()
        meta = dict(backend=self.backend.name, torch_version=torch.__version__, config=self.config,
                    max_allocated_bytes=None, max_reserved_bytes=None, events_dropped=0,
                    capture=dict(stacks=self.stacks, max_entries=self.max_entries),
                    **facts, **self.extra_meta)
        meta.setdefault("allocator_settings", None)
        meta["alloc_conf_env"] = os.environ.get("PYTORCH_CUDA_ALLOC_CONF") or \
            os.environ.get("PYTORCH_ALLOC_CONF")
        self.writer = TraceWriter(self.out, self.name, meta, run_id=self.run_id, subdir=self.subdir)
        self.run_dir = self.writer.run_dir
        start = getattr(self.backend, "start_segments", None)
        if start:
            self.writer.append("segments", start)
        self.tracer = ModuleTracer(self, self.backend.set_tag)
        self.tracer.install()
        self._install_optimizer_hooks()
        self._patch_backward()
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
                    stacks=self.stacks, max_entries=self.max_entries,
                    flush_interval_s=self.flush_interval_s, drain_interval_s=self.drain_interval_s,
                    extra_meta=self.extra_meta)

    def step(self) -> None:
        """Mark the end of a step. Once called, optimizer steps no longer end steps."""
        if not self._explicit_steps:
            self._explicit_steps = True
            if self._last_boundary_auto and self._events_since_boundary == 0:
                return  # the optimizer hook already ended this step
        self._boundary()

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
            self.writer.append("phases", {"step": [self.step_index], "phase": [self.phase],
                                          "ts_us_start": [self._phase_start], "ts_us_end": [now]})
        self.phase = phase
        self._phase_start = now

    def on_new_root(self, module, root_name, prefix) -> None:
        # Parameters usually pre-date the capture; drain first so the role's
        # stream position is exact, then name their storages.
        self._drain()
        named = [(prefix + n, p) for n, p in module.named_parameters(remove_duplicate=True)]
        for n, p in named:
            self._param_names.setdefault(id(p), n)
        rows = _tensor_roles(named, "parameter", self.backend, self.backend.events_seen,
                             self.step_index)
        buf = _tensor_roles(
            ((prefix + n, b) for n, b in module.named_buffers(remove_duplicate=True)),
            "buffer", self.backend, self.backend.events_seen, self.step_index)
        for r in (rows, buf):
            if r:
                self.writer.append("roles", r)

    def on_new_module(self, module, name, parent, depth) -> None:
        params = list(module.parameters(recurse=False))
        buffers = list(module.buffers(recurse=False))
        self.writer.append("modules", {
            "module": [name], "parent": [parent], "class_name": [type(module).__name__],
            "depth": [depth],
            "param_bytes": [sum(p.numel() * p.element_size() for p in params)],
            "buffer_bytes": [sum(b.numel() * b.element_size() for b in buffers)],
            "param_count": [sum(p.numel() for p in params)],
        })

    def on_root_exit(self) -> None:
        # Inference loops may never step: drain on a timer so the ring never fills.
        if time.perf_counter() - self._last_drain > self.drain_interval_s:
            self._drain()
            self._maybe_flush()

    def _boundary(self, auto=False) -> None:
        t0 = time.perf_counter()
        self._drain()
        self._write_step_row()
        self.enter_phase(None)
        self.step_index += 1
        self._last_boundary_auto = auto
        self._events_since_boundary = 0
        self.tracer.retag()
        self._maybe_flush()
        self._capture_s += time.perf_counter() - t0

    def _drain(self, with_segments: bool = False) -> None:
        cols = self.backend.drain(self.step_index, with_segments)
        self._last_drain = time.perf_counter()
        if cols:
            self._events_since_boundary += len(cols["ts_us"])
            self.writer.append("events", cols)
        frames, stacks = self.backend.interner.take_new()
        if frames:
            self.writer.append("frames", frames)
        if stacks:
            self.writer.append("stacks", stacks)

    def _write_step_row(self) -> None:
        row = dict(step=self.step_index, ts_us=_now_us(), events_seen=self.backend.events_seen,
                   events_dropped=self.backend.dropped, **self.backend.stats_row())
        self.writer.append("steps", {k: [v] for k, v in row.items()})

    def _maybe_flush(self, force=False) -> None:
        if force or time.perf_counter() - self._last_flush >= self.flush_interval_s:
            self.writer.flush(self._live_meta())
            self._last_flush = time.perf_counter()

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
        self._drain()  # exact stream position for the roles below
        pos, step = self.backend.events_seen, self.step_index
        names = self._param_names
        grads = _tensor_roles(_named_grads(optimizer, names), "gradient", self.backend, pos, step)
        states = _tensor_roles(_named_states(optimizer, names), "optimizer_state", self.backend,
                               pos, step, known=self._known_states)
        for r in (grads, states):
            if r:
                self.writer.append("roles", r)
        self._capture_s += time.perf_counter() - t0
        if not self._explicit_steps:
            self._boundary(auto=True)
        else:
            self.enter_phase(None)
            self.tracer.retag()

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
            return original(tensors, *args, **kwargs)

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
        self.tracer.remove()
        if self.backend.name == "cuda":
            from profiler.capture import cuda
            cuda.clear_oom()

    def _finish(self, status: str, exc) -> None:
        self._drain(with_segments=True)
        if self._events_since_boundary or self.step_index == 0:
            self._write_step_row()
        self.enter_phase(None)
        segs = self.backend.segments_now(SnapshotKind.END.value, _now_us(),
                                         self.backend.events_seen)
        if segs:
            self.writer.append("segments", segs)
        self.backend.stop()
        final = self._live_meta()
        final.update(events_seen=self.backend.events_seen)
        if self._oom_info:
            final["oom"] = self._oom_info
        if exc is not None and status != Status.COMPLETE.value:
            final["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        self.writer.finalize(status, final)


def _is_clean_exit(exc_type, exc) -> bool:
    return issubclass(exc_type, SystemExit) and exc.code in (0, None)


def _make_backend(name: str, stacks: bool, max_entries: int):
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        from profiler.capture.cuda import CudaBackend
        return CudaBackend(stacks=stacks, max_entries=max_entries)
    if name == "cpu":
        from profiler.capture.cpu import CpuBackend
        return CpuBackend(stacks=stacks)
    raise ValueError(f"unknown backend {name!r}: expected auto, cuda or cpu")


def _param_name(p, names, index) -> str:
    return names.get(id(p)) or f"param{index}"


def _named_grads(optimizer, names):
    i = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is not None:
                yield f"{_param_name(p, names, i)}.grad", p.grad
            i += 1


def _named_states(optimizer, names):
    for i, (p, state) in enumerate(optimizer.state.items()):
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                yield f"{_param_name(p, names, i)}.{key}", value


def _tensor_roles(named, role, backend, event_index, step, known=None) -> dict | None:
    """Role rows for the backend's device; one row per distinct storage.

    `known` (name -> addr) skips tensors already registered at the same address:
    optimizer states live across steps and need registering once.
    """
    want = "cuda" if backend.name == "cuda" else "cpu"
    now = _now_us()
    seen = set()
    cols: dict[str, list] = {k: [] for k in ("ts_us", "event_index", "step", "addr",
                                             "size_bytes", "role", "name")}
    for name, t in named:
        if t.device.type != want:
            continue
        # The storage's start without building a storage object (a hot path each step).
        addr = t.data_ptr() - t.storage_offset() * t.element_size()
        if addr in seen or addr == 0 or (known is not None and known.get(name) == addr):
            continue
        seen.add(addr)
        if known is not None:
            known[name] = addr
        for k, v in (("ts_us", now), ("event_index", event_index), ("step", step), ("addr", addr),
                     ("size_bytes", t.nbytes), ("role", role), ("name", name)):
            cols[k].append(v)
    return cols if cols["addr"] else None


# -- module-level API -----------------------------------------------------------------

def profile(out="traces", name=None, config=None, *, backend="auto", stacks=True,
            max_entries=1_000_000, flush_interval_s=0.5, drain_interval_s=0.5, **kw) -> Profiler:
    """Capture memory events into a trace directory under `out`.

    `name` labels the run, `config` records what the run toggled (shown in
    comparisons). `backend` is "auto" (CUDA when available), "cuda" or "cpu".
    `stacks` records Python stacks for allocations. Use as `with profile(...) as prof:`
    (call `prof.step()` per step if the script has no optimizer) or as a decorator.
    """
    return Profiler(out=out, name=name, config=config, backend=backend, stacks=stacks,
                    max_entries=max_entries, flush_interval_s=flush_interval_s,
                    drain_interval_s=drain_interval_s, **kw)


def active() -> Profiler | None:
    return _ACTIVE


def mark(phase: str) -> None:
    """Start a user-defined phase in the active capture (a no-op without one)."""
    if _ACTIVE is not None:
        _ACTIVE.mark(phase)


def step() -> None:
    if _ACTIVE is not None:
        _ACTIVE.step()


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
