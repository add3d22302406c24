"""Module and phase attribution: which layer, in which phase, made each allocation.

Every allocation is stamped with a tag ("phase|module|category") through the
backend's `set_tag`; on CUDA that is `_set_memory_metadata`, which is
thread-local, so each thread's tag is set by hooks that run on that thread:

- forward: global forward pre/post hooks on the thread that runs forward;
- backward: a pre-hook on the `grad_fn` of each module's output, which runs on
  autograd's worker thread just before that module's backward starts;
- recompute: a forward hook that fires inside a backward graph task is
  activation checkpointing re-running forward.

Hooks run thousands of times a step, so they do dictionary lookups and one
C call each; tag strings are built once per (phase, module, hint).

A compiled wrapper (torch.compile's OptimizedModule) takes the name of the module
it wraps, and paths leave out its `_orig_mod`: names are the user's whether dynamo
compiles the model or runs it eagerly (under the CPU backend's dispatch mode).
Inside a compiled graph no hook runs; profiler/capture/compiled.py names what
the graph allocates.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from profiler.capture import module_calls
from profiler.trace.schema import Phase
from profiler.trace.tags import make_tag

if TYPE_CHECKING:
    from torch.autograd.graph import Node

_FORWARD = Phase.FORWARD.value
_BACKWARD = Phase.BACKWARD.value
_RECOMPUTE = Phase.RECOMPUTE.value
_BUILTIN = {p.value for p in Phase}
_in_backward = torch._C._current_graph_task_id
_grad_enabled = torch.is_grad_enabled
# Phases that a root forward ends: forward starts a new step's work after them.
_STEP_PHASES = (None, _BACKWARD, Phase.OPTIMIZER.value)
_RECENT_MAX = 64
# torch.compile(module) wraps `module` in an OptimizedModule, which holds it as `_orig_mod`.
_COMPILED_CHILD = "_orig_mod"


def user_path(path: str) -> str:
    """A module path as the user's model names it: without compiled wrappers' `_orig_mod`."""
    if _COMPILED_CHILD not in path:
        return path
    return ".".join(p for p in path.split(".") if p != _COMPILED_CHILD)


def _is_compiled_wrapper(module: nn.Module) -> bool:
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")  # none compiled without it
    return eval_frame is not None and isinstance(module, eval_frame.OptimizedModule)


def _wrapped(module: nn.Module) -> nn.Module:
    """The module a compiled wrapper holds."""
    return cast(nn.Module, module._orig_mod)


def _unwrapped(module: nn.Module) -> nn.Module:
    while _is_compiled_wrapper(module):
        module = _wrapped(module)
    return module


class _ThreadState(threading.local):
    def __init__(self) -> None:
        self.stack: list[str] = []  # module names, innermost last
        self.hint: str | None = None  # category hint (profiler.category)
        self.module_hook_task: int | None = None  # graph task of the last module bw hook
        self.before_recompute = ""  # the tag a recomputation interrupted


class ModuleTracer:
    """Installs the hooks and keeps names; `recorder` owns phases and steps."""

    def __init__(self, recorder, set_tag: Callable[[str], None], get_tag: Callable[[], str]) -> None:
        self.recorder = recorder
        self.set_tag = set_tag
        self.get_tag = get_tag
        self.names: dict[nn.Module, str] = {}
        self.roots: list[nn.Module] = []
        self._root_prefixes: dict[str, str] = {}  # root name -> its children's prefix
        self.local = _ThreadState()
        self._tags: dict[tuple, str] = {}
        self._bw_hooks: dict[str, Callable[[Any], None]] = {}
        # grad_fns of recent root outputs, so that backward() knows the loss's
        # own backward is already stamped with the root module's name.
        # grad_fns hooked during this root forward, by id, holding the wrapper so
        # that the id cannot be reused. A module that returns its child's output
        # shares the child's grad_fn, and the child (hooked first) keeps it. The
        # references are dropped when the root forward returns, and at most
        # _RECENT_MAX are held, so no graph outlives its own lifetime by much.
        self._recent: dict[int, object] = {}
        self._hooks: tuple | None = None  # (pre, post, unwind, failed) while installed

    # -- lifecycle ----------------------------------------------------------------
    def install(self) -> None:
        """Run this tracer's hooks around every module call (module_calls.py)."""
        self._hooks = (self._pre_forward, self._post_forward, self._unwind, self._failed)
        module_calls.wrap(self._hooks)

    def _failed(self, error: Exception) -> None:
        self.recorder.capture_failed(error)

    @property
    def installed(self) -> bool:
        return self._hooks is not None

    def remove(self) -> None:
        if self._hooks is not None:
            module_calls.unwrap(self._hooks)
        self._hooks = None

    def _unwind(self) -> None:
        """A forward raised: leave its module, so the stack stays true for the caller."""
        st = self.local
        if st.stack:
            st.stack.pop()
        if _in_backward() != -1 and not st.stack:
            self.set_tag(st.before_recompute)
        else:
            self.retag()

    # -- tags ---------------------------------------------------------------------
    def tag(self, phase: str | None, module: str | None, hint: str | None = None) -> str:
        key = (phase, module, hint)
        t = self._tags.get(key)
        if t is None:
            t = self._tags[key] = make_tag(phase, module, hint)
        return t

    def retag(self) -> None:
        """Re-stamp this thread after a phase or hint change."""
        st = self.local
        self.set_tag(self.tag(self.recorder.phase, st.stack[-1] if st.stack else None, st.hint))

    def register_root(self, module: nn.Module) -> str:
        """Name a model's modules and register its parameters without running it
        (for compiled models, whose forward runs no module hooks)."""
        name = self.names.get(module)
        return name if name is not None else self._discover(module)

    # push_hint and pop_hint do retag's work inline: a category block runs in hot loops (a KV
    # cache's update, a layer a token), where each Python frame is a cold one, a few
    # microseconds in place (bench/README.md).
    def push_hint(self, name: str) -> str | None:
        """Stamp this thread's allocations with the category hint `name`; returns the hint
        it replaces, for pop_hint."""
        st = self.local
        previous, st.hint = st.hint, name
        key = (self.recorder.phase, st.stack[-1] if st.stack else None, name)
        tag = self._tags.get(key)
        self.set_tag(tag if tag is not None else self.tag(*key))
        return previous

    def pop_hint(self, previous: str | None, still_on: bool) -> None:
        """Put back the hint push_hint replaced; re-tag if `still_on` (the capture may have
        ended inside the block)."""
        st = self.local
        st.hint = previous
        if still_on:
            key = (self.recorder.phase, st.stack[-1] if st.stack else None, previous)
            tag = self._tags.get(key)
            self.set_tag(tag if tag is not None else self.tag(*key))

    # -- naming -------------------------------------------------------------------
    def _discover(self, module: nn.Module) -> str:
        stack = self.local.stack
        if stack:
            # Not a registered submodule of a known root (built on the fly):
            # name it under the module that called it.
            name = f"{stack[-1]}.{type(_unwrapped(module)).__name__}"
            self._add(module, name, parent=stack[-1], depth=stack[-1].count(".") + 1)
            return name
        # A new outermost module. The first root's children keep their plain
        # paths (blocks.3.attn.qkv); later roots are prefixed by class name.
        root_name = type(_unwrapped(module)).__name__
        taken = set(self.names.values())
        if root_name in taken:
            i = 2
            while f"{root_name}#{i}" in taken:
                i += 1
            root_name = f"{root_name}#{i}"
        prefix = "" if not self.roots else root_name + "."
        self.roots.append(module)
        self._root_prefixes[root_name] = prefix
        for path, sub in module.named_modules(remove_duplicate=True):
            if sub in self.names:
                continue
            path = user_path(path)
            if not path:
                self._add(sub, root_name, parent=None, depth=0)
                continue
            parent = path.rpartition(".")[0]
            parent_name = (prefix + parent) if parent else root_name
            self._add(sub, prefix + path, parent=parent_name, depth=path.count(".") + 1)
        # The root hooks go on what the script calls: on a compiled wrapper they run outside
        # dynamo's graph, so adding or removing them never changes what dynamo guards on.
        self.recorder.on_new_root(_unwrapped(module), root_name, prefix, called=module)
        return root_name

    def _add(self, module: nn.Module, name: str, parent: str | None, depth: int) -> None:
        """Name `module`; a compiled wrapper shares its name with the module it wraps,
        which alone makes the modules-table row."""
        self.names[module] = name
        if _is_compiled_wrapper(module):
            self._add(_wrapped(module), name, parent, depth)
        else:
            self.recorder.on_new_module(module, name, parent, depth)

    def compiled_child(self, compiled: str, relative: str) -> str:
        """The name of the module at `relative` (a path inside a compiled graph) below the
        module named `compiled`, the compiled callable the graph ran in."""
        prefix = self._root_prefixes.get(compiled)
        return (prefix if prefix is not None else compiled + ".") + relative

    # -- hooks (hot path) -----------------------------------------------------------
    def _pre_forward(self, module, args):
        name = self.names.get(module)
        if name is None:
            name = self._discover(module)
        st = self.local
        if _in_backward() != -1:
            phase = _RECOMPUTE
            if not st.stack:  # checkpointing re-runs forward in the middle of backward
                st.before_recompute = self.get_tag()
        else:
            phase = self.recorder.phase
            if phase is not _FORWARD and phase in _STEP_PHASES and not st.stack:
                self.recorder.enter_phase(_FORWARD)
                phase = _FORWARD
        if st.stack and phase is not _RECOMPUTE and args and _grad_enabled():
            self._hook_caller(st.stack[-1], args[0])
        st.stack.append(name)
        key = (phase, name, st.hint)
        tag = self._tags.get(key)
        self.set_tag(tag if tag is not None else self.tag(*key))

    def _post_forward(self, module, args, output):
        st = self.local
        if not st.stack:
            return None
        stack = st.stack
        name = stack.pop()
        recompute = _in_backward() != -1
        if recompute and not stack:
            self.set_tag(st.before_recompute)  # back to the backward that asked for it
        else:
            key = (_RECOMPUTE if recompute else self.recorder.phase, stack[-1] if stack else None, st.hint)
            tag = self._tags.get(key)
            self.set_tag(tag if tag is not None else self.tag(*key))
        if not recompute and _grad_enabled():
            self._hook_backward(name, output)
        if not st.stack:
            self._recent.clear()
            self.recorder.on_root_exit()
        return None

    def _hook_backward(self, name: str, output):
        """Stamp `name` on the autograd thread when this module's backward begins.

        Every differentiable output is hooked: a model that returns (logits, loss)
        starts its backward at the loss, not at the first output.
        """
        if isinstance(output, torch.Tensor):
            fn = output.grad_fn
            if fn is None:
                return
            fns: Sequence[Node] = (fn,)
        else:
            fns = _grad_fns(output)
            if not fns:
                return
        recent = self._recent
        hook = self._bw_hooks.get(name) or self._make_bw_hook(name)
        for fn in fns:
            if recent.get(id(fn)) is fn:
                continue
            fn.register_prehook(hook)
            self._remember(fn)

    def _hook_caller(self, caller: str, first_input) -> None:
        """Hand the backward back to the caller once a child's backward is done.

        If a module's input was made by its caller's own code (not by another
        module's output), backward reaches that input's grad_fn right after the
        child's backward: e.g. `attn` runs SDPA, then `attn.proj`; without this,
        SDPA's backward would carry `attn.proj`.
        """
        if not isinstance(first_input, torch.Tensor):
            return
        fn = first_input.grad_fn
        if fn is None or self._recent.get(id(fn)) is fn:
            return
        fn.register_prehook(self._bw_hooks.get(caller) or self._make_bw_hook(caller))
        self._remember(fn)

    def _remember(self, fn) -> None:
        recent = self._recent
        recent[id(fn)] = fn
        if len(recent) > _RECENT_MAX:
            del recent[next(iter(recent))]

    def _make_bw_hook(self, name: str) -> Callable[[Any], None]:
        tag = self.tag(_BACKWARD, name)
        set_tag = self.set_tag
        local = self.local

        def hook(grad_outputs, _tag=tag) -> None:
            set_tag(_tag)
            local.module_hook_task = _in_backward()

        self._bw_hooks[name] = hook
        return hook

    def loss_hook(self):
        """A grad_fn pre-hook for backward() roots: stamps 'backward' with no module,
        unless a module's own hook on the same node already ran in this backward."""
        tag = self.tag(_BACKWARD, None)
        set_tag, local = self.set_tag, self.local

        def hook(grad_outputs):
            if getattr(local, "module_hook_task", None) != _in_backward():
                set_tag(tag)

        return hook


def _grad_fns(output) -> list[Node]:
    """grad_fns of the tensors in a tuple, list or dict output (ModelOutput is a dict)."""
    if isinstance(output, dict):
        output = list(output.values())
    if not isinstance(output, (tuple, list)):
        return []
    seen: list[Node] = []
    for o in output:
        if isinstance(o, torch.Tensor) and o.grad_fn is not None and o.grad_fn not in seen:
            seen.append(o.grad_fn)
    return seen


def is_builtin_phase(phase: str | None) -> bool:
    return phase in _BUILTIN
