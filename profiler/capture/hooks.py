"""Hooks a capture installs for its duration: optimizer steps and autograd's backward.

Each installer returns the function that takes its hooks out again (idempotent).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from profiler.trace.schema import Phase

_BWD = Phase.BACKWARD.value


def hook_optimizer_steps(before: Callable[[], None], after: Callable[[object], None]) -> Callable[[], None]:
    """Call `before()` as any optimizer's step starts and `after(optimizer)` once it ends."""
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    def pre_hook(optimizer, args, kwargs):
        before()
        return None  # a pre-hook's result would replace the step's arguments

    def post_hook(optimizer, args, kwargs):
        after(optimizer)

    handles = [register_optimizer_step_pre_hook(pre_hook), register_optimizer_step_post_hook(post_hook)]

    def remove() -> None:
        while handles:
            handles.pop().remove()

    return remove


def patch_backward(
    enter_phase: Callable[[str], None], tracer, backend, keep_stacks: Callable[[], bool] = bool
) -> Callable[[], None]:
    """Wrap torch.autograd.backward: the backward phase, its tag on the loss's own
    backward, and no Python stacks while autograd's thread allocates, unless
    `keep_stacks()`: a compiled backward runs generated Python code, whose lines
    name its layers (profiler/capture/compiled.py)."""
    original = torch.autograd.backward
    # A backend that names backward allocations by their forward stack (the CPU one)
    # learns the roots' nodes here: no forward op reads a loss.
    note_roots = getattr(backend, "note_backward_roots", None)

    def tag_backward(tensors) -> None:
        enter_phase(_BWD)
        backend.set_tag(tracer.tag(_BWD, None))
        roots = [tensors] if isinstance(tensors, torch.Tensor) else list(tensors or ())
        if note_roots is not None:
            note_roots(roots)
        # Work before the first module's backward (a loss computed outside any
        # module) runs on autograd's thread: stamp it there.
        for t in roots:
            fn = t.grad_fn if isinstance(t, torch.Tensor) else None
            if fn is not None:
                fn.register_prehook(tracer.loss_hook())

    @functools.wraps(original)
    def backward(tensors, *args, **kwargs):
        pause = False
        try:
            tag_backward(tensors)
            pause = not keep_stacks()
            if pause:
                backend.pause_stacks(True)
        except Exception as e:  # noqa: BLE001 - ours: the capture stops, the backward runs
            tracer.recorder.capture_failed(e)
        try:
            return original(tensors, *args, **kwargs)
        finally:
            if pause:
                backend.pause_stacks(False)

    torch.autograd.backward = backward
    restored = False

    def restore() -> None:
        nonlocal restored
        if not restored:
            torch.autograd.backward = original
            restored = True

    return restore
