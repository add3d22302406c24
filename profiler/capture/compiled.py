"""Layer names for allocations made by torch.compile'd (inductor) code.

Inside a compiled graph no module hook runs: the module tracer sees only the
compiled callable (the OptimizedModule of `torch.compile(model)`), so every
allocation of the graph would carry that one name. Inductor's generated wrapper
allocates each buffer on a line of its own, and the CUDA allocator records that
line as the innermost Python frame of the allocation. So, for each wrapper file
inductor writes, `compiled_lines.line_infos` maps line -> (module, phase), and at
drain time a stack that passes through such a line renames its allocations.

The hook wraps `GraphLowering._compile_to_module_lines` (older releases:
`compile_to_module`), which writes and imports the wrapper once per graph; it
changes no graph and no config that a cache key or a dynamo guard sees. It goes in
when vramscope is imported (import_hooks.watch_inductor), without importing
inductor: a meta-path finder patches `torch._inductor.graph` as it is imported. A
model compiled before the capture began thus keeps its names, and the capture
causes no recompile. Inductor's FX-graph and AOTAutograd caches are bypassed while a
capture runs, since a cache hit skips the lowering that the map comes from (a graph
compiled from those caches before the capture has no map: its allocations keep the
compiled model's name). Any failure is kept (meta.json
`compile_attribution_errors`), never raised.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable

from profiler.capture import compiled_store, dynamo_frames, import_hooks
from profiler.capture.compiled_lines import LineInfo, line_infos
from profiler.trace.finalize.markers import PREFIX as MARKER_PREFIX
from profiler.trace.schema import Phase
from profiler.trace.tags import make_tag, parse_tag

# Cache switches set off while the hook is in: (module, attribute).
_CACHES = (
    ("torch._inductor.config", "fx_graph_cache"),
    ("torch._inductor.config", "fx_graph_remote_cache"),
    ("torch._functorch.config", "enable_autograd_cache"),
    ("torch._functorch.config", "enable_remote_autograd_cache"),
)
# Runtime phases the map knows better: the compiled graph says forward, backward or recompute.
_MAPPED_PHASES = (None, Phase.FORWARD.value, Phase.BACKWARD.value)
_RECOMPUTE = Phase.RECOMPUTE.value

_INDUCTOR_CODE = "torch._inductor.codecache"  # loaded before any generated code can run
_lock = threading.Lock()
_maps: dict[str, dict[int, LineInfo]] = {}  # generated file (real path) -> line -> info, for the process


def mapped_files() -> set[str]:
    """Generated files with a map (real paths)."""
    return set(_maps)


def file_map(filename: str) -> dict[int, LineInfo] | None:
    """The map of a generated file, by the name a frame gives it."""
    m = _maps.get(filename)
    if m is None:
        real = os.path.realpath(filename)
        m = _maps.get(real)
        if m is None and (m := compiled_store.load(real)) is not None:  # compiled from inductor's cache
            with _lock:
                _maps[real] = m
    return m


def lookup(filename: str, line: int) -> LineInfo | None:
    m = file_map(filename)
    return None if m is None else m.get(line)


def patch_lowering(graph_module) -> None:
    """Wrap inductor's lowering, once per process, to record each graph's line map.

    The wrapper stays for the process's life: a graph compiled before a capture is
    named in it too. Failures are kept (the active captures' `errors`), never raised."""
    global _lowering_patched
    with _lock:
        if _lowering_patched:
            return
        _lowering_patched = True
    try:
        cls = graph_module.GraphLowering
        name = "_compile_to_module_lines" if hasattr(cls, "_compile_to_module_lines") else "compile_to_module"
        setattr(cls, name, _with_line_map(getattr(cls, name), with_lines=name == "_compile_to_module_lines"))
    except Exception as e:  # an inductor we do not know: compile as usual, unnamed
        _report_error(f"install: {e!r}")
    for hook in list(_hooks):  # captures that started before inductor was imported
        hook.bypass_caches()


_lowering_patched = False
_hooks: list[CompileHook] = []  # the captures running now
_errors: list[str] = []  # failures while no capture ran, for the next capture's meta


def _report_error(message: str) -> None:
    with _lock:
        targets = [h.errors for h in _hooks] or [_errors]
    for errors in targets:
        if len(errors) < 20:
            errors.append(message)


def _with_line_map(original: Callable, with_lines: bool) -> Callable:
    def compile_with_line_map(graph, *args, **kwargs):
        code = args[0] if with_lines and args else None
        try:
            lines_before = code.value.count("\n") if code is not None else 0
        except Exception:
            lines_before = 0
        module = original(graph, *args, **kwargs)
        _record(graph, module, code, lines_before)
        return module

    return compile_with_line_map


def _record(graph, module, code, lines_before: int) -> None:
    t0 = time.perf_counter()
    try:
        path = module.__file__
        if code is not None:  # a compile-time autotuning block may have been prepended
            source, line_map, shift = code.value, code.line_map, code.value.count("\n") - lines_before
        else:
            with open(path) as f:
                source, line_map, shift = f.read(), None, 0
        infos = line_infos(graph, source, line_map, shift)
        real = os.path.realpath(path)
        with _lock:
            _maps[real] = infos
            hooks = list(_hooks)
        compiled_store.save(real, infos)
        for hook in hooks:
            hook.graphs += 1
            hook.lines += len(infos)
            hook.seconds += time.perf_counter() - t0
    except Exception as e:  # never break compilation
        _report_error(f"record: {e!r}")


class CompileHook:
    """One capture's view of inductor: the lowering records line maps (patch_lowering, put
    in place now if vramscope's import did not), and inductor's FX-graph and AOTAutograd
    caches are bypassed while the capture runs, since a cache hit skips the lowering."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self.graphs = 0
        self.lines = 0
        self.seconds = 0.0
        self.maps_before = 0  # graphs mapped in this process before the capture began
        self._loaded_before = 0  # maps read from the store before it began
        self._saved_config: list[tuple[object, str, object]] = []

    def install(self) -> None:
        with _lock:
            _hooks.append(self)
            self.errors.extend(_errors)
            _errors.clear()
            self.maps_before = len(_maps)
            self._loaded_before = compiled_store.loaded
        import_hooks.when_imported(import_hooks.INDUCTOR_GRAPH, patch_lowering)
        if import_hooks.INDUCTOR_GRAPH in sys.modules:
            self.bypass_caches()

    def remove(self) -> None:
        with _lock:
            if self in _hooks:
                _hooks.remove(self)
        import_hooks.cancel(import_hooks.INDUCTOR_GRAPH, patch_lowering)  # import_hooks.watch_inductor's stays
        for module, attr, value in self._saved_config:
            setattr(module, attr, value)
        self._saved_config = []

    def meta(self) -> dict:
        """meta.json fields: what the hook mapped, and its errors (none when nothing compiled)."""
        out: dict = {}
        stored = compiled_store.loaded - self._loaded_before
        if self.graphs or self.maps_before or stored:
            out["compile_attribution"] = dict(
                graphs=self.graphs,
                lines=self.lines,
                seconds=round(self.seconds, 3),
                graphs_before=self.maps_before,
                graphs_stored=stored,
            )
        errors = self.errors + dynamo_frames.errors
        if errors:
            out["compile_attribution_errors"] = errors[:20]
        return out

    def bypass_caches(self) -> None:
        if self._saved_config:
            return
        for module_name, attr in _CACHES:
            module = sys.modules.get(module_name)
            if module is None:
                module = __import__(module_name, fromlist=["_"])
            if hasattr(module, attr):
                self._saved_config.append((module, attr, getattr(module, attr)))
                setattr(module, attr, False)
                if getattr(module, attr):  # forced on through its environment variable
                    self.errors.append(f"{module_name}.{attr} is forced on: graphs it caches are not named")


class CompiledTags:
    """Renames, at drain time, allocations whose stack passes through generated code.

    `child_name(module, relative)` joins a map's module (relative to the compiled
    callable) to the module the tracer had on the tag when the graph ran.
    """

    def __init__(self, child_name: Callable[[str, str], str]) -> None:
        self.child_name = child_name
        self._by_stack: dict[int, LineInfo] = {}  # stack id -> the innermost mapped line's info
        self._seen: set[int] = set()
        self._tags: dict[tuple[str, int], str] = {}
        self._files: dict[str, dict[int, LineInfo] | None] = {}  # filename -> its map, while _maps keeps its size
        self._maps_size = 0

    def see_stack(self, stack_id: int, frames) -> None:
        """Once per new stack: the first frame (innermost first) on a mapped line."""
        if stack_id in self._seen or (not _maps and _INDUCTOR_CODE not in sys.modules):
            return  # no generated code has run: no stack passes through any
        self._seen.add(stack_id)
        files = self._files
        if self._maps_size != len(_maps):
            files.clear()
            self._maps_size = len(_maps)
        for f in frames:
            name = f["filename"]
            m = files[name] if name in files else files.setdefault(name, file_map(name))
            info = m.get(f["line"]) if m is not None else None
            if info is not None:
                self._by_stack[stack_id] = info
                return

    def retag(self, tags, stack_ids):
        """`tags` with those of events on mapped stacks renamed (one dict lookup per event)."""
        by_stack = self._by_stack
        if not by_stack:
            return tags
        out = list(tags)
        cache = self._tags
        for i, sid in enumerate(stack_ids):
            if sid in by_stack:
                key = (out[i], sid)
                tag = cache.get(key)
                if tag is None:
                    tag = cache[key] = self._renamed(out[i], by_stack[sid])
                out[i] = tag
        return out

    def renames(self) -> bool:
        """Whether any stack seen so far passes through a mapped line."""
        return bool(self._by_stack)

    def renamed(self, tag: str, stack_id: int) -> str:
        """`tag` as an allocation on stack `stack_id` carries it (unchanged off mapped stacks)."""
        info = self._by_stack.get(stack_id)
        if info is None:
            return tag
        key = (tag, stack_id)
        out = self._tags.get(key)
        if out is None:
            out = self._tags[key] = self._renamed(tag, info)
        return out

    def _renamed(self, tag: str, info: LineInfo) -> str:
        if not tag or tag.startswith(MARKER_PREFIX):
            return tag
        phase, module, category = parse_tag(tag)
        if module is None:  # no compiled callable on the tag: the map's path has no anchor
            return tag
        if phase in _MAPPED_PHASES:
            phase = _RECOMPUTE if info.recompute else info.phase
        return make_tag(phase, self.child_name(module, info.module) if info.module else module, category)
