"""vramscope for transformers.Trainer.

    from profiler.integrations.hf import VramscopeCallback

    cb = VramscopeCallback(out="traces", name="sft", steps=range(1, 6))
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[cb])
    with cb:                      # closes the capture with the error if train() raises
        trainer.train()
    print(cb.run_dir)

Steps are transformers' `state.global_step` after the step: the first optimizer
step is 1, as in the Trainer's logs. One step is one optimizer step (all its
gradient-accumulation micro-batches). Logging, evaluation and saving that run after
a step's end fall into the next captured step.
"""

from __future__ import annotations

import transformers
from transformers import TrainerCallback

from profiler.integrations import CaptureResults, StepCapture

__all__ = ["VramscopeCallback"]

CONVENTION = "transformers state.global_step after the step (first step = 1)"


class VramscopeCallback(CaptureResults, TrainerCallback):
    """Capture the chosen Trainer steps into a vramscope trace.

    out, name, config: as in `profiler.profile`. steps: global steps to capture (an
    int, a range or an iterable; None, all). ranks: the global process indices that
    capture (None, all; default, the main process). Other keyword arguments (stacks,
    modules, hooked_steps, backend, ...) go to `profiler.profile`.

    transformers reports no exception to callbacks: use the callback as a context
    manager around `trainer.train()` (or call `close(exc)`) so that a failing run's
    trace is closed with its error; otherwise an uncaught exception or the end of the
    process closes it.
    """

    def __init__(self, out="traces", name=None, steps=None, config=None, *, ranks=(0,), **profile_kwargs):
        self.capture = StepCapture(
            out=out,
            name=name,
            steps=steps,
            config=config,
            ranks=ranks,
            framework={"name": "transformers", "version": transformers.__version__},
            convention=CONVENTION,
            **profile_kwargs,
        )

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.capture.close(exc_type, exc, tb)
        return False

    # -- Trainer events -------------------------------------------------------------------
    def _rank_ok(self, args) -> bool:
        return self.capture.rank_ok(getattr(args, "process_index", 0))

    def on_train_begin(self, args, state, control, **kwargs):
        # A capture left open by an earlier train() call that raised outside `with cb:`.
        if self.capture.active:
            self.capture.close(exc=RuntimeError("a previous train() ended without on_train_end"))

    def on_step_begin(self, args, state, control, **kwargs):
        if self._rank_ok(args):
            self.capture.begin_step(state.global_step + 1, model=kwargs.get("model"))

    def on_step_end(self, args, state, control, **kwargs):
        if self._rank_ok(args):
            self.capture.end_step(state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        self.capture.close()
