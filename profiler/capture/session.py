"""The capture session: `profiler.profile(...)`, `prof.step()`, `profiler.mark(...)`.

One session owns a backend (backend.py), the module tracer and a writer. It decides when a
step ends (an optimizer step, `prof.step()` once a script calls it, or an inference forward:
inference.py), drains events (on CPU at every step end; on CUDA on a timer or paced: feed.py),
and records phases, roles (parameters, gradients, optimizer states) and counters. Everything
a capture accumulates is reset when it is entered: one Profiler entered twice writes two runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from pathlib import Path

from profiler.capture import api, distributed, failure, run_meta, signals
from profiler.capture.api import active, category, mark, record_kv, register_model, step
from profiler.capture.backend import make_backend
from profiler.capture.dynamo_frames import dynamo_compiled
from profiler.capture.failure import guarded
from profiler.capture.hooks import hook_optimizer_steps, patch_backward
from profiler.capture.modules import user_path
from profiler.capture.options import CaptureOptions
from profiler.capture.parts import CaptureParts, open_parts
from profiler.capture.roles import named_grads, named_states
from profiler.capture.sampling import HookSampling
from profiler.trace.schema import Phase, SnapshotKind
from profiler.trace.writer import TraceWriter

__all__ = ["CaptureOptions", "Profiler", "active", "category", "mark", "profile", "record_kv", "register_model", "step"]

_OPT = Phase.OPTIMIZER.value


def _now_us() -> int:
    return time.time_ns() // 1000


class Profiler:
    """Context manager and decorator. See `profile()` and CaptureOptions for the arguments."""

    def __init__(self, out="traces", name=None, config=None, **options) -> None:
        self.options = CaptureOptions(out=out, name=name, config=config, **options)
        self.run_dir: Path | None = None  # the last capture's, kept after it ends
        self._reset_state()

    @classmethod
    def from_options(cls, options: CaptureOptions) -> Profiler:
        return cls(**options.as_kwargs())

    def _reset_state(self) -> None:
        """Forget everything a capture accumulates (the writer and run_dir are replaced)."""
        self.phase: str | None = None
        self.step_index = 0
        self._phase_start = 0
        self._explicit_steps = self.options.explicit_steps
        self._last_boundary_auto = False
        self._awaiting_dist_facts = False
        self._oom_info: dict | None = None
        self._param_names: dict[int, str] = {}  # id(param) -> qualified name
        self._known_states: dict[tuple, int] = {}  # (param id, state key) -> registered data pointer
        self._capture_s = 0.0  # host time spent in our own step-boundary work
        self._hooks_on = False
        self.capturing = False  # entered, not yet left, and not stopped by a failure of ours
        self.failure: str | None = None  # why the capture stopped early (meta.json's capture_error)
        self._sampling = HookSampling(self.options, steps_exact=True)  # made again for the backend at start
        self._run: CaptureParts | None = None  # made by _start
        self._remove_optimizer_hooks = self._restore_backward = self._restore_signals = lambda: None

    @property
    def _parts(self) -> CaptureParts:
        if self._run is None:
            raise RuntimeError("this vramscope capture has not started")
        return self._run

    @property
    def writer(self) -> TraceWriter | None:
        """The last capture's writer (None before the first)."""
        return self._run.writer if self._run is not None else None

    # -- entering and leaving -----------------------------------------------------------
    def __enter__(self):
        api.activate(self)  # raises while another capture is active
        try:
            self._start()
        except BaseException:
            api.deactivate()
            raise
        return self

    def _start(self) -> None:
        self._reset_state()
        opts = self.options
        rank = distributed.rank_from_env() if opts.subdir is None else None
        # The process group's backend is known only once the script made it, and it may be
        # gone again by the end (destroy_process_group): look at step boundaries.
        self._awaiting_dist_facts = rank is not None
        run = self._run = open_parts(self, opts, rank, make_backend)
        self.run_dir = run.writer.run_dir
        self._sampling = HookSampling(opts, steps_exact=run.backend.positions_need_drain)  # drains per step
        self._set_module_hooks(self._sampling.hooks(0))
        self._remove_optimizer_hooks = hook_optimizer_steps(self._on_optimizer_start, self._on_optimizer_end)
        self._restore_backward = patch_backward(self.enter_phase, run.tracer, run.backend, keep_stacks=dynamo_compiled)
        run.install()
        run.backend.install_oom_observer(self._on_oom)
        self._restore_signals = signals.install()
        self.capturing = True

    def __exit__(self, exc_type, exc, tb):
        api.deactivate()
        self._restore_signals()  # a second SIGTERM while finalizing kills at once, as usual
        failure.check_recording(self)
        status = run_meta.exit_status(exc_type, exc)
        if self.failure is not None:  # stopped early: publish what reached disk before that
            failure.quietly(self._remove_optimizer_hooks)
            failure.publish(self._parts.writer, self.failure, self.step_index)
        else:
            self._end(status, exc)
        signals.redeliver(exc)  # ended by SIGTERM or SIGHUP: the process ends as it would have
        return False  # never swallow the user's exception

    def _end(self, status: str, exc) -> None:
        self.capturing = False
        try:
            self._remove_optimizer_hooks()
            self._unhook()
            self._finish(status, exc)
        except Exception as e:  # never let our failure replace the user's outcome
            meta = run_meta.unfinalized_meta(status, e, self.run_dir, self.step_index)
            with contextlib.suppress(Exception):
                self._parts.writer.flush(meta, wait=True)

    def __call__(self, fn):
        """Decorator form: each call of `fn` is one capture, with a run of its own."""
        options = dataclasses.replace(self.options, run_id=None, subdir=None)

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            with Profiler.from_options(options):
                return fn(*args, **kwargs)

        return wrapper

    # -- public API -----------------------------------------------------------------
    @guarded
    def step(self) -> None:
        """Mark the end of a step. Once called, optimizer steps no longer end steps."""
        if not self._explicit_steps:
            self._explicit_steps = True
            if self._last_boundary_auto and self._parts.feed.events_since_boundary == 0:
                return  # the optimizer hook already ended this step
        self._boundary()

    @guarded
    def register_model(self, model) -> str:
        """Name `model`'s modules and register its parameters now.

        Module hooks do this on a model's first forward; a compiled model runs no
        module hooks, so call this to keep its names and parameter category.
        """
        return self._parts.tracer.register_root(model)

    @guarded
    def update_meta(self, fields: dict) -> None:
        """Add run-level facts to meta.json (written at the next drain and at the end)."""
        self._parts.writer.meta.update(fields)

    @guarded
    def mark(self, phase: str) -> None:
        """Start a user-defined phase (until the next mark, forward, or step)."""
        self.enter_phase(phase)
        self._parts.tracer.retag()

    @guarded
    def push_category(self, name: str) -> str | None:
        """profiler.category's entry: stamp this thread's allocations with `name`; returns the
        hint it replaced, for pop_category."""
        return self._parts.tracer.push_hint(name)

    @guarded
    def pop_category(self, previous: str | None) -> None:
        """profiler.category's exit: put back the hint push_category replaced."""
        self._parts.tracer.pop_hint(previous, still_on=api.active() is self)

    @guarded
    def position(self) -> int:
        """An exact stream position for roles registered now (see profiler.trace.finalize.markers).

        On CUDA this drops a marker, which re-tags the calling thread: the caller re-tags.
        """
        backend = self._parts.backend
        if backend.positions_need_drain:
            self._drain(full=False)
        return backend.position(self.step_index)

    @guarded
    def register_roles(self, named, role: str, position: int, step: int, known=None) -> None:
        """Give the storages of `named` ((name, tensor) pairs) `role`, as alive at `position`.

        `known` (name -> addr) skips tensors registered before at the same address.
        """
        self._parts.register_roles(named, role, position, step, known=known)

    @guarded
    def record_kv_row(self, row: dict, cache=None) -> None:
        """Add a KV cache row (profiler.record_kv) at the current step; `cache` then gets no row of ours."""
        self._parts.feed.buffer("kv", step=self.step_index, ts_us=_now_us(), **row)
        self._parts.caches.recorded(cache)

    # -- phases and modules (called by the tracer and hooks) --------------------------
    @guarded
    def enter_phase(self, phase: str | None) -> None:
        self._set_phase(phase)

    def _set_phase(self, phase: str | None) -> None:
        if phase == self.phase:
            return
        now = _now_us()
        if self.phase is not None:
            self._parts.feed.buffer(
                "phases", step=self.step_index, phase=self.phase, ts_us_start=self._phase_start, ts_us_end=now
            )
        self.phase = phase
        self._phase_start = now

    @guarded
    def on_new_root(self, module, root_name, prefix, called=None) -> None:
        # Parameters usually pre-date the capture: name their storages, at a position
        # in the stream that is exact (a marker on CUDA, the event count on CPU).
        run = self._parts
        run.backend.adopt(module)
        pos = self.position()
        named = [(user_path(prefix + n), p) for n, p in module.named_parameters(remove_duplicate=True)]
        for n, p in named:
            self._param_names.setdefault(id(p), n)
        self.register_roles(named, "parameter", pos, self.step_index)
        buffers = ((user_path(prefix + n), b) for n, b in module.named_buffers(remove_duplicate=True))
        self.register_roles(buffers, "buffer", pos, self.step_index)
        run.on_new_root(module if called is None else called)
        run.tracer.retag()

    @guarded
    def on_new_module(self, module, name, parent, depth) -> None:
        self._parts.buffer_module(module, name, parent, depth)

    @guarded
    def on_root_exit(self) -> None:
        self._drain_if_due()  # inference loops may never step: the ring must not fill

    def _drain_if_due(self) -> None:
        if self._parts.feed.due(self.options.drain_interval_s):
            t0 = time.perf_counter()
            self._drain()
            self._capture_s += time.perf_counter() - t0

    @guarded
    def _on_optimizer_start(self) -> None:
        self.mark(_OPT)
        # Backward's kernels are queued ahead of the GPU: a due drain overlaps them (at the step's
        # end it would add to it). Where markers give steps only: elsewhere the drain labels them.
        if not self._parts.backend.positions_need_drain:
            self._drain_if_due()

    @guarded
    def _on_optimizer_end(self, optimizer) -> None:
        t0 = time.perf_counter()
        step = self.step_index
        if not self._explicit_steps:
            pos = self._boundary(auto=True)
        else:
            pos = self.position()
            self._set_phase(None)
            self._parts.tracer.retag()
        # Gradients and states are alive right now, at the boundary's position.
        names = self._param_names
        self.register_roles(named_grads(optimizer, names), "gradient", pos, step)
        self.register_roles(named_states(optimizer, names, self._known_states), "optimizer_state", pos, step)
        self._capture_s += time.perf_counter() - t0

    # -- steps ------------------------------------------------------------------------
    @guarded
    def _boundary(self, auto=False) -> int:
        """End the current step; returns the stream position of the boundary."""
        t0 = time.perf_counter()
        if self._awaiting_dist_facts and (facts := distributed.late_facts()):
            self._parts.writer.meta.update(facts)
            self._awaiting_dist_facts = False
        run = self._parts
        backend, feed = run.backend, run.feed
        row = dict(backend.stats_row(), step=self.step_index, ts_us=_now_us(), modules_hooked=self._hooks_on)
        self._set_phase(None)
        run.step_ends(self.step_index)
        if backend.positions_need_drain:  # drained before the index moves: events keep their step
            self._drain(full=False)
        self._sampling.step_ended(self.step_index, self._hooks_on, row.get("max_allocated_bytes"))
        self.step_index += 1
        pos = backend.position(self.step_index)
        row.update(events_seen=backend.events_seen, events_dropped=backend.dropped)
        feed.buffer_row("steps", row)
        self._last_boundary_auto = auto
        feed.events_since_boundary = 0
        paced = feed.pacing.step_ended()
        if backend.positions_need_drain:  # its events were drained above: its rows join them
            self._drain(events=False)
        elif (timed := feed.due(self.options.drain_interval_s)) or paced:
            self._drain(full=timed)  # before deciding: the sampling learns from the drained steps
        self._set_module_hooks(self._sampling.hooks(self.step_index))
        run.tracer.retag()
        self._capture_s += time.perf_counter() - t0
        return pos

    def _set_module_hooks(self, on: bool) -> None:
        if on and not self._hooks_on:
            self._parts.tracer.install()
        elif self._hooks_on and not on:
            self._parts.tracer.remove()
        self._hooks_on = on

    # -- draining -----------------------------------------------------------------------
    def _drain(self, with_segments: bool = False, full: bool = True, events: bool = True) -> None:
        """Move new allocator events (if `events`) to the writer; `full`: rows too, and flush (feed.py)."""
        run, t0 = self._parts, time.perf_counter()
        self._sampling.observe(run.feed.drain(self.step_index, with_segments, events, rows=full))
        if full:
            run.writer.flush(self._live_meta() if run.feed.meta_due(self.options.drain_interval_s) else None)
        run.feed.pacing.drained(time.perf_counter() - t0)

    def _live_meta(self) -> dict:
        return run_meta.live_meta(self._parts.backend, self.step_index, self._capture_s)

    # -- OOM --------------------------------------------------------------------------
    def _on_oom(self, device, alloc_bytes, device_allocated, device_free) -> None:
        if not self.capturing:
            return
        oom = self._oom_info = run_meta.oom_meta(device, alloc_bytes, device_allocated, device_free, self.step_index)
        try:
            self._drain(with_segments=True)
            self._parts.append_segments(SnapshotKind.OOM.value)
            self._parts.writer.flush(dict(self._live_meta(), oom=oom), wait=True)  # the process may not outlive it
        except Exception as e:  # the user's OOM error matters more than ours
            oom["capture_error"] = repr(e)

    capture_failed = failure.stop_capture  # an error of ours: the capture stops, the script runs on

    # -- the end ------------------------------------------------------------------------
    def _unhook(self) -> None:
        """Take out every hook but the optimizer's (failure.stop_capture says why)."""
        self._restore_backward()
        self._parts.tracer.remove()  # _hooks_on stays: the last step's row says whether it was hooked
        self._parts.uninstall()

    def _finish(self, status: str, exc) -> None:
        run = self._parts
        backend, feed = run.backend, run.feed
        run.caches.step_ends(self.step_index)
        self._drain(with_segments=True, full=False)  # rows below, once the last ones are buffered
        if feed.events_since_boundary or self.step_index == 0:
            row = dict(step=self.step_index, ts_us=_now_us(), modules_hooked=self._hooks_on, **backend.stats_row())
            feed.buffer("steps", events_seen=backend.events_seen, events_dropped=backend.dropped, **row)
        self._set_phase(None)
        run.append_segments(SnapshotKind.END.value)
        feed.push_rows()
        backend.stop()
        final = run_meta.final_meta(self._live_meta(), backend.events_seen, self._oom_info, status, exc)
        final.update(run.compiled.meta())
        run.writer.finalize(status, final)


def profile(
    out="traces",
    name=None,
    config=None,
    *,
    backend="auto",
    stacks=True,
    modules=True,
    hooked_steps=(3, 50),
    max_entries=1_000_000,
    drain_interval_s=0.5,
    explicit_steps=False,
    **kw,
) -> Profiler:
    """Capture memory events into a trace directory under `out`.

    `name` labels the run, `config` records what the run toggled (shown in comparisons).
    `backend` is "auto" (CUDA when available), "cuda" or "cpu". `stacks` records Python
    stacks; `modules=False` skips module hooks (allocations then carry phases, no module).
    `hooked_steps=(first, every)` hooks modules in the first steps, every `every`-th step and
    the step after a new kind of step or a new peak (capture/sampling.py); other steps take
    modules and phases from a hooked step (None: every step). `**kw`: CaptureOptions' other
    fields. Use as `with profile(...) as prof:` or as a decorator. Steps end at optimizer
    steps, no_grad forwards or `prof.step()`. Bad options raise CaptureOptionError here.
    """
    named = {k: v for k, v in locals().items() if k != "kw"}  # the arguments above, by name
    return Profiler(**named, **kw)
