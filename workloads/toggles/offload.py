"""Activation offload: tensors saved for backward go to host memory during forward.

torch.autograd.graph.save_on_cpu packs every tensor that autograd saves into a
CPU copy (pinned on cuda, so the copies can overlap compute) and brings it back
when backward needs it. Device memory then holds activations only while they are
in use, at the price of two host transfers each. On the CPU the "copy" is the
tensor itself: nothing moves, and the toggle only exercises the hooks.

Inside a checkpointed Block, checkpointing's own saved-tensor hooks are innermost
and win: offload then applies to what checkpointing keeps outside its Blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch.autograd.graph import save_on_cpu

from workloads.toggles.base import Toggle, is_on
from workloads.toggles.plan import StepPlan


@dataclass(kw_only=True, slots=True)
class OffloadConfig(Toggle):
    key = "offload"
    stage = "step"
    cli = {"action": "store_const", "const": "on"}
    ablation = (("offload", {"offload": "on"}),)

    pin_memory: bool | None = None
    """Pin the host copies; None pins on cuda (faster, asynchronous copies) and not on cpu."""

    @classmethod
    def from_value(cls, value) -> OffloadConfig:
        if is_on(value):
            return cls()
        raise ValueError(f"offload: expected on or off, got {value!r}")

    def to_value(self) -> str:
        return "on"

    def apply(self, plan: StepPlan) -> None:
        pin = plan.device.type == "cuda" if self.pin_memory is None else self.pin_memory
        # save_on_cpu is looked up at each forward, so a test can substitute a spy.
        plan.forward_contexts.append(lambda: save_on_cpu(pin_memory=pin))
