"""What the step-level toggles leave behind: how one optimizer step runs.

Model-level toggles (checkpointing, compile) change the model; step-level ones
(precision, attention, offload, accumulation) change how a step drives it. They
fill in a StepPlan, which `workloads.train.Trainer` follows.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

import torch

ContextFactory = Callable[[], AbstractContextManager]


@dataclass(kw_only=True, slots=True)
class StepPlan:
    device: torch.device
    """Where the step runs."""
    micro_batches: int = 1
    """Forward/backward passes per optimizer step, over equal slices of the batch."""
    step_contexts: list[ContextFactory] = field(default_factory=list)
    """Entered once per step, around every micro-batch's forward and backward."""
    forward_contexts: list[ContextFactory] = field(default_factory=list)
    """Entered around each micro-batch's forward only (innermost last)."""
    scaler: torch.amp.GradScaler | None = None
    """Loss scaling for fp16; None steps the optimizer directly."""

    def split(self, batch: tuple[torch.Tensor, ...]) -> Iterator[tuple[torch.Tensor, ...]]:
        """The batch in `micro_batches` equal slices along dim 0 (views, no copies)."""
        if self.micro_batches == 1:
            yield batch
            return
        yield from zip(*(t.chunk(self.micro_batches, dim=0) for t in batch))

    @staticmethod
    def enter(stack: contextlib.ExitStack, factories: list[ContextFactory]) -> None:
        for make in factories:
            stack.enter_context(make())
