"""transformers' KV caches, found without a change to the user's code.

While a capture runs, `transformers.cache_utils.Cache.update` (which every cache type goes
through: it hands the states to `self.layers[layer_idx].update`) and
`Cache.early_initialization` are wrapped, so that

- what they allocate (the tensors a DynamicLayer grows by torch.cat, the zeros a StaticLayer
  preallocates) is categorized kv_cache: where events carry Python stacks, at finalize, from
  the cache code's frames in them (profiler/trace/finalize/sites.py); without stacks, through
  the hint that profiler.category sets, stamped here around each call;
- each cache that is updated is remembered (a weak reference) and measured by kv_row: once
  at the end of each inference forward (profiler/capture/inference.py), and at each step end
  if it changed since; the rows go to the kv table with the step they belong to, and the
  shapes of the formula (kv_shapes) to meta.json's `kv_shapes`, by cache name.

transformers is never imported here: the wrap is made once the user's code has imported
`transformers.cache_utils` (looked for when the capture starts, at each new root module and
at each step end), and taken out when the capture ends. If the API differs (no Cache.update),
a warning says so once and the capture carries on without it. Under torch.compile the
wrappers step aside (allocations of compiled code are not categorized).
"""

from __future__ import annotations

import functools
import sys
import time
import warnings
import weakref
from collections.abc import Callable

import torch

from profiler.capture.kv import kv_row, kv_shapes
from profiler.trace.schema import Category

_MODULE = "transformers.cache_utils"
_KV = Category.KV_CACHE.value
_compiling = torch.compiler.is_compiling


class CacheWatch:
    """Wraps transformers' Cache for one capture; buffers the kv rows of the caches it meets."""

    def __init__(
        self, tracer, still_on: Callable[[], bool], feed, meta: dict, stamp: bool = True, kv_bytes=None
    ) -> None:
        self._tracer = tracer  # stamps the kv_cache hint (the session's category, per call)
        self._stamp = stamp  # stamp the hint: events carry no stacks that finalize reads it from
        self.on = False  # wrapped, until uninstall (what the marking wrapper checks: no calls)
        self._kv_bytes = kv_bytes  # the native tracker's, which measures a cache in one call (kv.py)
        self._still_on = still_on  # whether the capture is still the active one
        self._feed = feed
        self._meta = meta  # the writer's meta.json dict
        self._tried = False
        self._patched: list[tuple[type, str, object, object]] = []  # (class, name, original, wrapper)
        self._caches: dict[int, tuple[weakref.ref, str]] = {}  # id(cache) -> (ref, name)
        self._dirty: set[int] = set()  # updated since last measured
        self._rows: dict[int, dict] = {}  # measured in the current step, by id(cache)
        self._shaped: dict[str, tuple] = {}  # cache name -> (batch, layers) its kv_shapes were taken at

    # -- wrapping -------------------------------------------------------------------------
    def install(self) -> None:
        """Wrap Cache's methods once transformers.cache_utils is imported (a dict lookup until then)."""
        if self._tried:
            return
        module = sys.modules.get(_MODULE)
        if module is None:
            return
        self._tried = True
        try:
            cls = module.Cache
            for name in ("update", "early_initialization"):
                original = cls.__dict__.get(name)
                if callable(original):
                    if name == "update" and not self._stamp:
                        wrapper = self._wrap_remember(original)
                    else:
                        wrapper = self._wrap(original, remember=name == "update")
                    setattr(cls, name, wrapper)
                    self._patched.append((cls, name, original, wrapper))
            if not any(name == "update" for _, name, _, _ in self._patched):
                raise AttributeError("transformers.cache_utils.Cache has no update method")
            self.on = True
        except Exception as e:
            _warn(e)

    def uninstall(self) -> None:
        self.on = False
        while self._patched:
            cls, name, original, wrapper = self._patched.pop()
            if cls.__dict__.get(name) is wrapper:  # leave alone what someone wrapped after us
                setattr(cls, name, original)

    def _wrap(self, original, remember: bool):
        # Runs once per layer per token, after the layer's own work has pushed this code out of
        # the CPU's caches: tens of microseconds a call measured in place, against 2.5 us in a
        # warm loop (bench/README.md). So remember's fast path, push_hint and pop_hint are
        # inlined here: each Python frame less is a cold frame less.
        watch, tracer, still_on, caches, dirty = self, self._tracer, self._still_on, self._caches, self._dirty

        @functools.wraps(original)
        def wrapper(cache, *args, **kwargs):
            if _compiling() or not still_on():  # inside a graph being traced, or after the capture
                return original(cache, *args, **kwargs)
            try:
                if remember:
                    key = id(cache)
                    known = caches.get(key)
                    if known is not None and known[0]() is cache:
                        dirty.add(key)
                    else:
                        watch.remember(cache)
                local = tracer.local
                previous, local.hint = local.hint, _KV  # the hint: tracer.push_hint's work
                tracer.retag()
            except Exception as e:  # ours: the update itself must still happen
                _warn(e)
                return original(cache, *args, **kwargs)
            try:
                return original(cache, *args, **kwargs)
            finally:
                try:  # tracer.pop_hint's work, with no frames of its own or a context manager's
                    local.hint = previous
                    if still_on():
                        tracer.retag()
                except Exception:  # noqa: BLE001, S110 - the update's result or error is the user's
                    pass

        return wrapper

    def _wrap_remember(self, original):
        # With stacks, finalize reads the category from the cache code's frames: the update
        # only marks its cache as changed. Measured in place in a CPU generate() loop, a call
        # costs 4-11 us less than with _wrap's two re-tags (bench/README.md, plain build).
        watch, caches, dirty = self, self._caches, self._dirty

        @functools.wraps(original)
        def wrapper(cache, *args, **kwargs):
            if watch.on and not _compiling():
                try:
                    key = id(cache)
                    known = caches.get(key)
                    if known is not None and known[0]() is cache:
                        dirty.add(key)
                    else:
                        watch.remember(cache)
                except Exception as e:  # ours: the update itself must still happen
                    _warn(e)
            return original(cache, *args, **kwargs)

        return wrapper

    # -- caches ---------------------------------------------------------------------------
    def remember(self, cache) -> None:
        key = id(cache)
        self._dirty.add(key)
        known = self._caches.get(key)
        if known is not None and known[0]() is cache:
            return
        self._caches[key] = (weakref.ref(cache), self._name_for(cache))

    def _name_for(self, cache) -> str:
        """The class name; `Class#2`, ... while another live cache of that class holds the name."""
        taken = {name for ref, name in self._caches.values() if ref() is not None}
        base = name = type(cache).__name__
        i = 2
        while name in taken:
            name, i = f"{base}#{i}", i + 1
        return name

    def recorded(self, cache) -> None:
        """profiler.record_kv recorded `cache` itself in this step: no row of ours for it."""
        if cache is None:
            return
        key = id(cache)
        self._dirty.discard(key)
        self._rows.pop(key, None)

    def measure(self) -> None:
        """Measure the caches updated since their last measurement (a forward just ended)."""
        for key in list(self._dirty):
            self._dirty.discard(key)
            ref, name = self._caches.get(key, (None, ""))
            cache = ref() if ref is not None else None
            if cache is None:
                continue
            row = kv_row(cache, name, self._kv_bytes)
            if row is None:
                continue
            self._rows[key] = dict(row, ts_us=time.time_ns() // 1000)
            # The formula's shapes change with the batch or the layers only (not per token).
            shaped = (row["batch"], len(getattr(cache, "layers", None) or ()))
            if self._shaped.get(name) != shaped:
                shapes = kv_shapes(cache)
                if shapes is not None:
                    self._meta.setdefault("kv_shapes", {})[name] = shapes
                    self._shaped[name] = shaped

    def step_ends(self, step: int) -> None:
        """Buffer this step's rows (measuring what changed since) as the kv rows of `step`."""
        if not self._caches:  # no cache met, so no rows: a decode loop with a cache of its own
            return
        try:
            self.measure()
        except Exception as e:
            _warn(e)
        for row in self._rows.values():
            self._feed.buffer("kv", step=step, **row)
        self._rows = {}
        for key, (ref, _) in list(self._caches.items()):
            if ref() is None:
                del self._caches[key]


_warned = False


def _warn(error: Exception) -> None:
    """Say once per process that caches are not followed, and why."""
    global _warned
    if _warned:
        return
    _warned = True
    warnings.warn(
        f"vramscope: transformers' KV caches are not followed ({error!r}); the capture goes on without them",
        RuntimeWarning,
        stacklevel=3,
    )
