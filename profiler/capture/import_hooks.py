"""Run code when a module is imported, without importing it first.

The capture patches two parts of torch that most scripts never import: inductor's
lowering (profiler/capture/compiled.py) and dynamo's frame handling (module_calls.py's
wrapper is one frame dynamo must leave alone). Importing them up front would cost
seconds for nothing, so a meta-path finder waits for each and runs the callbacks
right after the module has executed. Standard library only: `import profiler` sets
the wait for inductor, and must not import torch.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import threading
from collections.abc import Callable

INDUCTOR_GRAPH = "torch._inductor.graph"
DYNAMO_EVAL_FRAME = "torch._dynamo.eval_frame"

_lock = threading.Lock()
_waiting: dict[str, list[Callable]] = {}  # module name -> callbacks run once it is imported


def when_imported(name: str, callback: Callable) -> None:
    """Call `callback(module)` once module `name` is imported: now if it is already.
    A callback must not raise; one already waiting for `name` is not added twice."""
    module = sys.modules.get(name)
    if module is not None:
        callback(module)
        return
    with _lock:
        callbacks = _waiting.setdefault(name, [])
        if callback not in callbacks:
            callbacks.append(callback)
        if _FINDER not in sys.meta_path:
            sys.meta_path.insert(0, _FINDER)


def cancel(name: str, callback: Callable) -> None:
    """Forget a callback still waiting for `name` (none: nothing to do)."""
    with _lock:
        callbacks = _waiting.get(name, [])
        if callback in callbacks:
            callbacks.remove(callback)
        if not callbacks:
            _waiting.pop(name, None)
        _drop_finder_if_idle()


def waiting() -> dict[str, int]:
    """Module name -> how many callbacks wait for it."""
    with _lock:
        return {name: len(callbacks) for name, callbacks in _waiting.items()}


def _drop_finder_if_idle() -> None:
    if not _waiting and _FINDER in sys.meta_path:
        sys.meta_path.remove(_FINDER)


def _imported(name: str, module) -> None:
    with _lock:
        callbacks = _waiting.pop(name, [])
        _drop_finder_if_idle()
    for callback in callbacks:
        callback(module)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname not in _waiting:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _ThenCall(spec.loader, fullname)
        return spec


class _ThenCall(importlib.abc.Loader):
    """The module's own loader, followed by the callbacks waiting for it."""

    def __init__(self, loader, name: str) -> None:
        self._loader = loader
        self._name = name

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        _imported(self._name, module)

    def __getattr__(self, name):  # get_source, get_filename, ... as the real loader
        return getattr(self._loader, name)


_FINDER = _Finder()
