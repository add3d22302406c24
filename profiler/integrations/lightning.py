"""vramscope for lightning.pytorch.Trainer.

    from profiler.integrations.lightning import VramscopeCallback

    cb = VramscopeCallback(out="traces", name="pl", steps=range(0, 5))
    trainer = L.Trainer(max_steps=100, callbacks=[cb])
    trainer.fit(model, train_dataloaders=loader)
    print(cb.run_dir)

Steps are Lightning's `trainer.global_step` when the step starts: the first
optimizer step is 0, as `self.global_step` reads inside `training_step` and as
loggers record it. One step is one optimizer step: with gradient accumulation, the
micro-batches before it belong to it. Validation that runs after a step's end falls
into the next captured step. Uses `lightning.pytorch`, not the standalone
`pytorch_lightning` package.
"""

from __future__ import annotations

import lightning
from lightning.pytorch import Callback

from profiler.integrations import CaptureResults, StepCapture
from profiler.trace.schema import Phase

__all__ = ["VramscopeCallback"]

CONVENTION = "lightning trainer.global_step at the start of the step (first step = 0)"


class VramscopeCallback(CaptureResults, Callback):
    """Capture the chosen Lightning steps into a vramscope trace.

    out, name, config: as in `profiler.profile`. steps: global steps to capture (an
    int, a range or an iterable; None, all). ranks: the global ranks that capture
    (None, all; default, rank 0). Other keyword arguments (stacks, modules,
    hooked_steps, backend, ...) go to `profiler.profile`. An exception inside `fit`
    closes the capture with the error recorded (on_exception).
    """

    def __init__(self, out="traces", name=None, steps=None, config=None, *, ranks=(0,), **profile_kwargs):
        super().__init__()
        self.capture = StepCapture(
            out=out,
            name=name,
            steps=steps,
            config=config,
            ranks=ranks,
            framework={"name": "lightning", "version": lightning.__version__},
            convention=CONVENTION,
            **profile_kwargs,
        )
        self._step_at_start: int | None = None

    # -- Trainer events -------------------------------------------------------------------
    def on_train_start(self, trainer, pl_module):
        if self.capture.active:  # left open by an earlier fit() that skipped our hooks
            self.capture.close(exc=RuntimeError("a previous fit() ended without on_train_end"))
        self._step_at_start = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if not self.capture.rank_ok(trainer.global_rank):
            return
        step = trainer.global_step
        # The first micro-batch of a step (every batch without accumulation).
        if self._step_at_start != step:
            self._step_at_start = step
            self.capture.begin_step(step, model=pl_module)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        # Lightning runs forward and backward inside optimizer.step(closure): the
        # optimizer's own pre-hook fires before them, so mark the update here.
        self.capture.phase(Phase.OPTIMIZER.value)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._step_at_start is None or not self.capture.rank_ok(trainer.global_rank):
            return
        if trainer.global_step > self._step_at_start:  # an optimizer step happened
            done, self._step_at_start = self._step_at_start, None
            self.capture.end_step(done)

    def on_train_end(self, trainer, pl_module):
        self.capture.close()

    def on_exception(self, trainer, pl_module, exception):
        self.capture.close(exc=exception)

    def teardown(self, trainer, pl_module, stage):
        # Last resort (fit interrupted in a way that reached neither hook).
        self.capture.close()
