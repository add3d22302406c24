"""Training-framework callbacks that capture chosen steps with vramscope.

    from profiler.integrations.hf import VramscopeCallback         # transformers.Trainer
    from profiler.integrations.lightning import VramscopeCallback  # lightning.pytorch.Trainer

Both share `StepCapture` (below), which knows nothing of either framework:
importing this package imports neither transformers nor lightning (nor torch).

Step numbers. `steps` and the numbers recorded in the trace are the framework's
own, as its logs show them:
  - transformers: `state.global_step` after the step (the first optimizer step is 1);
  - Lightning: `trainer.global_step` when the step starts (the first step is 0).
One framework step is one optimizer step, whatever the gradient accumulation.
The trace's meta.json holds `framework_steps`, {vramscope step: framework step}
(JSON keys are strings), and `framework` (name, version, convention, requested steps).

Chosen steps that are not consecutive (steps=[10, 500]) give one capture, one run
directory, per consecutive block; `run_dirs` lists them, `run_dir` is the latest.
"""

from __future__ import annotations

import atexit
import sys
import warnings
import weakref
from collections.abc import Callable, Iterable
from typing import Any

__all__ = ["StepCapture"]

# Live captures, closed at interpreter exit if a crash skipped every other path.
_OPEN: weakref.WeakSet[StepCapture] = weakref.WeakSet()


class StepCapture:
    """Opens a vramscope capture at the start of a chosen step, ends a vramscope step
    at the end of each, and closes the capture after the last step of a consecutive
    block of chosen steps, at the end of training, or on an exception.

    The framework callbacks call `begin_step`, `end_step`, `phase` and `close`.
    Use it directly to drive a hand-written loop the same way.
    """

    def __init__(
        self,
        out="traces",
        name=None,
        steps=None,
        config=None,
        *,
        framework=None,
        convention=None,
        ranks=(0,),
        **profile_kwargs,
    ):
        self.out = out
        self.name = name
        self.config = dict(config or {})
        self.steps = _normalize_steps(steps)
        self.ranks = None if ranks is None else frozenset(int(r) for r in ranks)
        self.framework = dict(framework or {})
        self.convention = convention
        bad = {"out", "name", "config", "extra_meta"} & set(profile_kwargs)
        if bad:
            raise TypeError(f"pass {sorted(bad)} to the callback itself, not as profile() kwargs")
        _check_profile_kwargs(profile_kwargs)
        self.profile_kwargs = dict(profile_kwargs)
        self.prof = None  # the open Profiler, if any
        self.run_dirs: list = []  # one per consecutive block of chosen steps
        self.step_map: dict[int, int] = {}  # vramscope step -> framework step (open capture)
        self.disabled = False  # set once a capture could not start (warned)
        self._prev_excepthook: Callable[..., Any] | None = None
        self._hook: Callable[..., Any] | None = None  # ours, while installed

    # -- what to capture ------------------------------------------------------------
    def wants(self, step: int) -> bool:
        if self.disabled:
            return False
        if self.steps is None:
            return True
        return int(step) in self.steps

    def done(self, step: int) -> bool:
        """True once no chosen step is left after `step`."""
        if self.steps is None:
            return False
        last = _last(self.steps)
        return last is None or int(step) >= last

    def rank_ok(self, rank) -> bool:
        return self.ranks is None or int(rank or 0) in self.ranks

    @property
    def run_dir(self):
        return self.run_dirs[-1] if self.run_dirs else None

    @property
    def active(self) -> bool:
        return self.prof is not None

    # -- driving ------------------------------------------------------------------------
    def begin_step(self, step: int, model=None) -> None:
        """Called at the start of framework step `step` (before its forward)."""
        if self.prof is not None and not self.wants(step):
            self.close()  # a step outside the chosen set: end this block here
        if self.prof is None and self.wants(step):
            self._open(model)

    def end_step(self, step: int) -> None:
        """Called when framework step `step` has finished (after its optimizer step)."""
        prof = self.prof
        if prof is None:
            return
        self.step_map[int(prof.step_index)] = int(step)
        self._publish_map()
        prof.step()
        if self.steps is not None and not self.wants(int(step) + 1):
            self.close()

    def phase(self, name: str) -> None:
        """Start a phase in the open capture (e.g. "optimizer" once a closure's backward ends)."""
        if self.prof is not None:
            self.prof.mark(name)

    def close(self, exc_type=None, exc=None, tb=None) -> None:
        """Close the open capture (Profiler.__exit__ with the exception, if any). Idempotent."""
        prof, self.prof = self.prof, None
        _OPEN.discard(self)
        self._restore_excepthook()
        if prof is None:
            return
        if exc is not None and exc_type is None:
            exc_type, tb = type(exc), exc.__traceback__
        self._publish_map(prof)
        prof.__exit__(exc_type, exc, tb)

    # A StepCapture (and so each callback) is also a context manager: an exception that
    # the framework reports to no callback (transformers has no on_exception) still
    # closes the capture with the error recorded.
    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.close(exc_type, exc, tb)
        return False

    # -- internals ------------------------------------------------------------------------
    def _open(self, model) -> None:
        from profiler.capture import session

        meta = {
            "framework": dict(self.framework, convention=self.convention, requested_steps=_describe_steps(self.steps)),
            "framework_steps": {},
        }
        # Steps end at the framework's step end (prof.step()), never at optimizer.step().
        prof = session.profile(
            out=self.out,
            name=self.name,
            config=self.config,
            extra_meta=meta,
            explicit_steps=True,
            **self.profile_kwargs,
        )
        try:
            prof.__enter__()
        except RuntimeError as e:  # another capture is active: do not break the training run
            warnings.warn(f"vramscope: not capturing: {e}", RuntimeWarning, stacklevel=3)
            self.disabled = True
            return
        self.prof = prof
        self.step_map = {}
        self.run_dirs.append(prof.run_dir)
        _OPEN.add(self)
        self._install_excepthook()
        if model is not None:
            try:
                prof.register_model(model)
            except Exception as e:  # naming is a nicety; the capture goes on without it
                warnings.warn(f"vramscope: could not register the model ({e})", RuntimeWarning, stacklevel=3)

    def _publish_map(self, prof=None) -> None:
        prof = prof or self.prof
        if getattr(prof, "writer", None) is not None:
            prof.update_meta({"framework_steps": {str(k): v for k, v in sorted(self.step_map.items())}})

    def _install_excepthook(self) -> None:
        # A script that dies of an uncaught exception: close with that exception first.
        if self._prev_excepthook is not None:
            return
        prev = sys.excepthook
        ref = weakref.ref(self)

        def hook(exc_type, exc, tb):
            cap = ref()
            if cap is not None:
                try:
                    cap.close(exc_type, exc, tb)
                except Exception:
                    pass
            prev(exc_type, exc, tb)

        self._prev_excepthook = prev
        self._hook = hook
        sys.excepthook = hook

    def _restore_excepthook(self) -> None:
        prev, self._prev_excepthook = self._prev_excepthook, None
        if prev is not None and sys.excepthook is self._hook:
            sys.excepthook = prev
        self._hook = None


def _check_profile_kwargs(kwargs) -> None:
    """Fail at construction, not at the first chosen step, on a misspelt profile() kwarg."""
    from profiler.capture.options import option_names

    known = set(option_names())
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise TypeError(f"unknown profile() arguments {unknown}; known: {sorted(known)}")


def _normalize_steps(steps):
    if steps is None:
        return None
    if isinstance(steps, int):
        return frozenset((steps,))
    if isinstance(steps, range):
        return steps  # membership and last element are O(1) for ranges
    if isinstance(steps, Iterable):
        return frozenset(int(s) for s in steps)
    raise TypeError(f"steps must be None, an int, a range or an iterable of ints, not {steps!r}")


def _last(steps):
    if isinstance(steps, range):
        return steps[-1] if len(steps) else None
    return max(steps) if steps else None


def _describe_steps(steps):
    if steps is None:
        return None
    if isinstance(steps, range):
        return {"start": steps.start, "stop": steps.stop, "step": steps.step}
    return sorted(steps)


@atexit.register
def _close_all() -> None:
    for cap in list(_OPEN):
        try:
            cap.close(RuntimeError, RuntimeError("the process exited with the capture open"), None)
        except Exception:
            pass


class CaptureResults:
    """What both callbacks expose: their traces, and closing the capture early."""

    capture: StepCapture

    @property
    def run_dir(self):
        """The latest trace directory (None before the first captured step)."""
        return self.capture.run_dir

    @property
    def run_dirs(self):
        """Every trace directory, one per consecutive block of chosen steps."""
        return list(self.capture.run_dirs)

    def close(self, exc=None) -> None:
        """Close the open capture now, recording `exc` (an exception) if given."""
        self.capture.close(exc=exc)
