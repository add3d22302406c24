"""The one wrapper of `nn.Module._call_impl` that runs the module tracer's hooks.

Global forward hooks would do, but they send every module call in the process through
_call_impl's generic hook path; one lean wrapper is cheaper, and modules with hooks of
their own still run them inside it. The wrapper runs the hooks of the tracer installed
now (`_calls.hooks`), or none: turning hooks off for a step changes no function.

Dynamo and the wrapper. Code that dynamo traced through the wrapper (a model compiled
while it was in) guards on it, and would be compiled again without it; so once dynamo
has compiled in the process the wrapper stays, running nothing of ours between
captures. Dynamo runs the wrapper's own frame as it is and compiles the frames it
calls (dynamo_frames.skip_in_dynamo): to dynamo it would otherwise be a new frame holding
the whole forward of a model compiled before the capture, compiled again.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from profiler.capture import dynamo_frames


class _CallHooks:
    """What the wrapper runs around a module call: (pre, post, unwind, failed), or nothing."""

    __slots__ = ("hooks", "original", "wrapper")

    def __init__(self) -> None:
        self.hooks: tuple | None = None
        self.original: Callable[..., Any] | None = None  # Module._call_impl before we wrapped it
        self.wrapper: Callable[..., Any] | None = None


_calls = _CallHooks()


def wrap(hooks: tuple) -> None:
    """Run `hooks` ((pre, post, unwind, failed) callables) around every module call."""
    if _calls.wrapper is None or nn.Module._call_impl is not _calls.wrapper:
        _install(hooks)
    _calls.hooks = hooks


def unwrap(hooks: tuple) -> None:
    """Stop running `hooks`; put Module._call_impl back unless dynamo has compiled."""
    if _calls.hooks is hooks:
        _calls.hooks = None
    if _calls.wrapper is None or nn.Module._call_impl is not _calls.wrapper or dynamo_frames.dynamo_compiled():
        return
    nn.Module._call_impl = _calls.original  # type: ignore[method-assign, assignment]
    _calls.wrapper = _calls.original = None


def _install(hooks: tuple) -> None:
    original = nn.Module._call_impl
    compiling = torch.compiler.is_compiling
    calls = _calls

    # An error of ours stops the capture (profiler/capture/failure.py); the module runs on.
    def _call_impl(module, *args, **kwargs):
        if compiling():  # inside a graph being traced: hooks would only break it
            return original(module, *args, **kwargs)
        now = calls.hooks
        if now is None:  # no capture, or its hooks are off in this step
            return original(module, *args, **kwargs)
        pre, post, unwind, failed = now
        try:
            pre(module, args)
        except Exception as e:  # noqa: BLE001
            failed(e)
        try:
            out = original(module, *args, **kwargs)
        except BaseException:
            try:
                unwind()
            except Exception as e:  # noqa: BLE001 - the script's exception is the one to raise
                failed(e)
            raise
        try:
            post(module, args, out)
        except Exception as e:  # noqa: BLE001
            failed(e)
        return out

    dynamo_frames.skip_in_dynamo(_call_impl.__code__, *(hook.__code__ for hook in hooks))
    calls.original, calls.wrapper = original, _call_impl
    nn.Module._call_impl = _call_impl  # type: ignore[method-assign, assignment]
