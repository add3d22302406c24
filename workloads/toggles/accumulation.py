"""Gradient accumulation: the same global batch as k micro-batches per optimizer step.

Each micro-batch is batch_size // k sequences; its loss is scaled by 1/k before
backward, so the accumulated gradient (and the reported loss, the mean of the
micro-batch losses) equals the full batch's. Activations scale with the
micro-batch, gradients and optimizer states do not.
"""

from __future__ import annotations

from dataclasses import dataclass

from workloads.toggles.base import Toggle
from workloads.toggles.plan import StepPlan


@dataclass(kw_only=True, slots=True)
class AccumulationConfig(Toggle):
    key = "accumulation"
    stage = "step"
    cli = {"type": int, "metavar": "K"}
    ablation = (("accum4", {"accumulation": 4}),)

    micro_batches: int
    """k, forward/backward passes per optimizer step; 2 or more (1 is off, None)."""

    def __post_init__(self) -> None:
        if isinstance(self.micro_batches, bool) or not isinstance(self.micro_batches, int):
            raise ValueError(f"accumulation must be a whole number of micro-batches, got {self.micro_batches!r}")
        if self.micro_batches < 2:
            raise ValueError(f"accumulation {self.micro_batches}: use 2 or more micro-batches (1 is off)")

    @classmethod
    def from_value(cls, value) -> AccumulationConfig | None:
        try:
            k = int(value) if isinstance(value, str) else value
        except ValueError:
            raise ValueError(f"accumulation {value!r} is not a whole number") from None
        return None if k == 1 else cls(micro_batches=k)

    def to_value(self) -> int:
        return self.micro_batches

    def check(self, toggles) -> None:
        batch_size = toggles.batch_size
        if batch_size is not None and batch_size % self.micro_batches:
            raise ValueError(
                f"accumulation {self.micro_batches} does not divide the batch of "
                f"{batch_size} sequences into equal micro-batches"
            )

    def apply(self, plan: StepPlan) -> None:
        plan.micro_batches = self.micro_batches
