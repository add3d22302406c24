"""Steps for inference: without an optimizer, each top-level forward is a step.

The rule. A capture begins with it on (off when `explicit_steps` is asked). While it is on,
a call of a root module (one the module tracer met outermost) that runs with grad disabled
(generate() runs under no_grad; eval loops under no_grad or inference_mode) ends the current
step: at the start of the next root call, or at the end of the capture. So generate() with
max_new_tokens=N, which calls the model N times (the prefill, then N-1 decodes), makes N steps,
each one forward and the sampling after it; and sampled module hooks (hooked_steps) work for
decode loops as for training. The rule turns off for good at

- the first root call with grad enabled (a training forward): a step end still pending is
  dropped, so a training step that begins with a no_grad forward (a reference model) stays
  one step;
- the first step end that the rule did not make: an optimizer step or prof.step().

Training captures therefore keep exactly their steps. Waiting for the next root call (rather
than ending the step as the forward returns) keeps a script that calls prof.step() after each
forward as it was: its prof.step() ends the step its forward began. A script that runs several
no_grad forwards per step and calls prof.step() itself should pass explicit_steps=True, or its
first step is split at each forward. A script that evaluates under no_grad before it trains
gets one step per evaluation forward before its first training step.

Root calls are seen through a forward pre-hook and an always-called forward hook on each root
module, whether module hooks run in the step or not; they run only for root calls, and are
taken out once the rule is off. With modules=False no root is known and the rule never acts.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

from profiler.trace.schema import Phase

_FORWARD = Phase.FORWARD.value
_compiling = torch.compiler.is_compiling


def _nothing() -> None:
    pass


class InferenceSteps:
    """Ends steps at inference forwards (see the module docstring for the rule)."""

    def __init__(self, tracer, end_step: Callable[[], object], enter_phase: Callable[[str], None], live: bool) -> None:
        self._tracer = tracer
        self._end_step = end_step  # the session's step boundary
        self._enter_phase = enter_phase
        self.live = live  # the rule is on
        self.pending = False  # a no_grad root call ended: its step ends at the next root call
        self.on_forward_end: Callable[[], None] = _nothing  # after each inference forward
        self._ending = False  # the step end in progress is ours
        self._depth = 0  # root calls in flight (a root may call another)
        self._pushed = False  # this root call was put on the tracer's stack by us
        self._handles: list = []

    def add_root(self, module) -> None:
        if self.live:
            self._handles.append(module.register_forward_pre_hook(self._pre))
            self._handles.append(module.register_forward_hook(self._post, always_call=True))

    def on_step_end(self) -> None:
        """Called by every step end; one the rule did not make turns it off."""
        self.pending = False
        if not self._ending:
            self.live = False
        if not self.live and self._depth == 0:
            self.remove()

    def remove(self) -> None:
        while self._handles:
            self._handles.pop().remove()

    # -- the hooks ------------------------------------------------------------------------
    def _pre(self, module, args):
        if not _compiling():  # inside a traced graph the hook would only break it
            try:
                self._enter(module, args)
            except Exception as e:
                _warn(e)
        return None

    def _post(self, module, args, output):
        if not _compiling():
            try:
                self._exit(module, args, output)
            except Exception as e:
                _warn(e)
        return None

    def _enter(self, module, args) -> None:
        self._depth += 1
        if self._depth > 1 or not self.live:
            return
        if torch.is_grad_enabled():  # training: its steps end at the optimizer or prof.step()
            self.live = self.pending = False
            return
        if not self.pending:
            return
        self._ending = True
        try:
            self._end_step()
        finally:
            self._ending = False
        self._enter_phase(_FORWARD)
        tracer = self._tracer
        if not tracer.installed:  # hooks are off in this step: a forward with no module
            if tracer.local.stack:  # they went off at this step end: take the root off their stack
                tracer.local.stack.pop()
            tracer.set_tag(tracer.tag(_FORWARD, None, tracer.local.hint))
        elif tracer.local.stack:  # the tracer saw this call begin: its root is on the stack
            tracer.retag()
        else:  # hooks came on at this step end, inside this call: make it their root
            tracer._pre_forward(module, args)
            self._pushed = True

    def _exit(self, module, args, output) -> None:
        if self._depth == 0:
            return
        self._depth -= 1
        if self._depth:
            return
        if self._pushed:
            self._pushed = False
            self._tracer._post_forward(module, args, output)
        if self.live:
            self.pending = True
            self.on_forward_end()


def _warn(error: Exception) -> None:
    warnings.warn(f"vramscope: inference step tracking failed ({error!r})", RuntimeWarning, stacklevel=3)
