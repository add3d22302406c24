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
changes no graph and no config that a cache key or a dynamo guard sees. It is put
in place only while a capture runs, and without importing inductor: if
`torch._inductor.graph` is not imported yet, a meta-path finder patches it as it
is imported. Inductor's FX-graph and AOTAutograd caches are bypassed while the
hook is in, since a cache hit skips the lowering that the map comes from. Any
failure is kept (meta.json `compile_attribution_errors`), never raised.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
import threading
import time
from collections.abc import Callable

from profiler.capture.compiled_lines import LineInfo, line_infos
from profiler.trace.finalize.markers import PREFIX as MARKER_PREFIX
from profiler.trace.schema import Phase
from profiler.trace.tags import make_tag, parse_tag

_GRAPH_MODULE = "torch._inductor.graph"
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

_lock = threading.Lock()
_maps: dict[str, dict[int, LineInfo]] = {}  # generated file (real path) -> line -> info, for the process


def dynamo_compiled() -> bool:
    """Whether dynamo has compiled any frame in this process (no import of dynamo)."""
    utils = sys.modules.get("torch._dynamo.utils")
    frames = getattr(utils, "counters", {}).get("frames") if utils is not None else None
    return bool(frames and frames.get("total", 0))


def mapped_files() -> set[str]:
    """Generated files with a map (real paths)."""
    return set(_maps)


def file_map(filename: str) -> dict[int, LineInfo] | None:
    """The map of a generated file, by the name a frame gives it."""
    m = _maps.get(filename)
    return m if m is not None else _maps.get(os.path.realpath(filename))


def lookup(filename: str, line: int) -> LineInfo | None:
    m = file_map(filename)
    return None if m is None else m.get(line)


class CompileHook:
    """Inductor's wrapper compilation, hooked for one capture."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self.graphs = 0
        self.lines = 0
        self.seconds = 0.0
        self._finder: _PatchOnImport | None = None
        self._patched: tuple[type, str, Callable] | None = None
        self._saved_config: list[tuple[object, str, object]] = []

    def install(self) -> None:
        graph_module = sys.modules.get(_GRAPH_MODULE)
        if graph_module is not None:
            self._patch(graph_module)
        else:
            self._finder = _PatchOnImport(self._patch)
            sys.meta_path.insert(0, self._finder)

    def remove(self) -> None:
        if self._finder is not None:
            if self._finder in sys.meta_path:
                sys.meta_path.remove(self._finder)
            self._finder = None
        if self._patched is not None:
            cls, name, original = self._patched
            setattr(cls, name, original)
            self._patched = None
        for module, attr, value in self._saved_config:
            setattr(module, attr, value)
        self._saved_config = []

    def meta(self) -> dict:
        """meta.json fields: what the hook mapped, and its errors (none when nothing compiled)."""
        out: dict = {}
        if self.graphs:
            out["compile_attribution"] = dict(graphs=self.graphs, lines=self.lines, seconds=round(self.seconds, 3))
        if self.errors:
            out["compile_attribution_errors"] = list(self.errors[:20])
        return out

    def _patch(self, graph_module) -> None:
        try:
            cls = graph_module.GraphLowering
            name = "_compile_to_module_lines" if hasattr(cls, "_compile_to_module_lines") else "compile_to_module"
            original = getattr(cls, name)
            setattr(cls, name, self._wrap(original, with_lines=name == "_compile_to_module_lines"))
            self._patched = (cls, name, original)
            self._bypass_caches()
        except Exception as e:  # an inductor we do not know: compile as usual, unnamed
            self.errors.append(f"install: {e!r}")

    def _bypass_caches(self) -> None:
        for module_name, attr in _CACHES:
            module = sys.modules.get(module_name)
            if module is None:
                module = __import__(module_name, fromlist=["_"])
            if hasattr(module, attr):
                self._saved_config.append((module, attr, getattr(module, attr)))
                setattr(module, attr, False)
                if getattr(module, attr):  # forced on through its environment variable
                    self.errors.append(f"{module_name}.{attr} is forced on: graphs it caches are not named")

    def _wrap(self, original: Callable, with_lines: bool) -> Callable:
        hook = self

        def compile_with_line_map(graph, *args, **kwargs):
            code = args[0] if with_lines and args else None
            try:
                lines_before = code.value.count("\n") if code is not None else 0
            except Exception:
                lines_before = 0
            module = original(graph, *args, **kwargs)
            hook._record(graph, module, code, lines_before)
            return module

        return compile_with_line_map

    def _record(self, graph, module, code, lines_before: int) -> None:
        t0 = time.perf_counter()
        try:
            path = module.__file__
            if code is not None:  # a compile-time autotuning block may have been prepended
                source, line_map, shift = code.value, code.line_map, code.value.count("\n") - lines_before
            else:
                with open(path) as f:
                    source, line_map, shift = f.read(), None, 0
            infos = line_infos(graph, source, line_map, shift)
            with _lock:
                _maps[os.path.realpath(path)] = infos
            self.graphs += 1
            self.lines += len(infos)
        except Exception as e:  # never break compilation
            self.errors.append(f"record: {e!r}")
        self.seconds += time.perf_counter() - t0


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Patches torch._inductor.graph right after it is imported."""

    def __init__(self, patch: Callable) -> None:
        self.patch = patch

    def find_spec(self, fullname, path, target=None):
        if fullname != _GRAPH_MODULE:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _ThenPatch(spec.loader, self.patch)
        return spec


class _ThenPatch(importlib.abc.Loader):
    def __init__(self, loader, patch: Callable) -> None:
        self._loader = loader
        self._patch = patch

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        self._patch(module)

    def __getattr__(self, name):  # get_source, get_filename, ... as the real loader
        return getattr(self._loader, name)


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
        if stack_id in self._seen or not _maps:
            return
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
