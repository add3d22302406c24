"""The parts of one running capture, and what they do together.

The session makes them as it is entered (backend, writer, the feed between the
two, the module tracer, the FSDP instrumentation, the hook on inductor's compiled
graphs, the inference step rule and the watch on transformers' caches) and keeps
them after it ends. What needs only the parts lives here; steps and phases are the
session's.
"""

from __future__ import annotations

import dataclasses
import time

from profiler.capture import api, distributed, placement
from profiler.capture.backend import Backend
from profiler.capture.compiled import CompiledTags, CompileHook
from profiler.capture.feed import TraceFeed
from profiler.capture.fsdp import FsdpInstrumentation
from profiler.capture.hf_cache import CacheWatch
from profiler.capture.inference import InferenceSteps
from profiler.capture.modules import ModuleTracer
from profiler.capture.roles import tensor_roles
from profiler.trace.writer import TraceWriter


@dataclasses.dataclass(frozen=True)
class CaptureParts:
    """Made together by the session as it is entered; kept after it ends."""

    backend: Backend
    writer: TraceWriter
    feed: TraceFeed
    tracer: ModuleTracer
    fsdp: FsdpInstrumentation
    compiled: CompileHook
    inference: InferenceSteps
    caches: CacheWatch

    def __post_init__(self) -> None:
        self.inference.on_forward_end = self.caches.measure  # an inference forward's cache state

    def install(self) -> None:
        """Hook what the parts watch (module hooks are the session's)."""
        self.fsdp.install()
        self.caches.install()

    def on_new_root(self, module) -> None:
        self.inference.add_root(module)
        self.caches.install()  # a model's first forward: transformers is imported by now if used

    def step_ends(self, step: int) -> None:
        """Step `step` ends: its KV rows, and the inference rule's view of who ends steps."""
        self.caches.step_ends(step)
        self.inference.on_step_end()
        self.caches.install()

    def register_roles(self, named, role: str, position: int, step: int, known=None) -> None:
        """Give the storages of `named` ((name, tensor) pairs) `role`, as alive at `position`."""
        self.feed.buffer_roles(tensor_roles(named, role, self.backend.device_type, position, step, known=known))

    def buffer_module(self, module, name: str, parent: str | None, depth: int) -> None:
        """A row of the modules table: where `module` sits, and what it holds itself."""
        params = list(module.parameters(recurse=False))
        buffers = list(module.buffers(recurse=False))
        self.feed.buffer(
            "modules",
            module=name,
            parent=parent,
            class_name=type(module).__name__,
            depth=depth,
            param_bytes=sum(p.numel() * p.element_size() for p in params),
            buffer_bytes=sum(b.numel() * b.element_size() for b in buffers),
            param_count=sum(p.numel() for p in params),
        )

    def append_segments(self, kind: str) -> None:
        """The segment map kept by the last drain(with_segments=True), if the backend has one."""
        backend = self.backend
        segs = backend.segments_now(kind, time.time_ns() // 1000, backend.events_seen)
        if segs:
            self.writer.append("segments", segs)

    def uninstall(self) -> None:
        """Take out what the parts hooked into torch (module hooks are the session's)."""
        self.fsdp.remove()
        self.compiled.remove()
        self.backend.remove_oom_observer()
        self.inference.remove()
        self.caches.uninstall()


def open_parts(session, opts, rank, make_backend) -> CaptureParts:
    """Start a backend, open the run's writer and make the parts that report to `session`.

    `rank`: this process's torchrun rank, or None; `make_backend`: the factory (tests swap it).
    Module, optimizer and backward hooks are the session's to install.
    """
    where = placement.place(opts, rank)
    backend = make_backend(
        opts.backend,
        opts.stacks,
        opts.max_entries,
        device=distributed.device_index(rank),
        capture_path=opts.capture_path,
    )
    facts = backend.start()
    try:
        # A backend that drains on a timer hands over tens of thousands of events at a time,
        # whose writing would stall the step that drains; one that drains every step keeps
        # its journals written at each step's end (what a killed process leaves).
        writer = placement.open_writer(opts, where, backend.name, facts, write_behind=not backend.positions_need_drain)
    except BaseException:
        backend.stop()
        raise
    feed = TraceFeed(backend, writer)
    if backend.start_segments:
        writer.append("segments", backend.start_segments)
    tracer = ModuleTracer(session, backend.set_tag, backend.get_tag)
    fsdp = FsdpInstrumentation(session, backend)
    inference = InferenceSteps(tracer, session._boundary, session.enter_phase, live=not opts.explicit_steps)
    kv_bytes = getattr(getattr(backend, "tracker", None), "kv_bytes", None)  # native backends' tracker
    caches = CacheWatch(
        tracer, lambda: api.active() is session, feed, writer.meta, stamp=not backend.stacks, kv_bytes=kv_bytes
    )
    run = CaptureParts(backend, writer, feed, tracer, fsdp, CompileHook(), inference, caches)
    run.compiled.install()
    backend.attribute_compiled(CompiledTags(tracer.compiled_child))
    return run
