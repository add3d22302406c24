"""The optimizer, by how much state it keeps per parameter.

sgd: none; sgd_momentum: one buffer (1x parameter bytes); adamw: exp_avg and
exp_avg_sq (2x) plus a step counter per parameter; adamw_fused: the same state,
updated by one fused CUDA kernel instead of foreach ops, which changes the step's
temporaries, not its state. Off (None) is plain AdamW, the baseline.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from workloads.toggles.base import Toggle

NAMES = ("sgd", "sgd_momentum", "adamw", "adamw_fused")
LR = 3e-4


@dataclass(kw_only=True, slots=True)
class OptimizerConfig(Toggle):
    key = "optimizer"
    stage = "optimizer"
    cli = {"choices": list(NAMES)}
    ablation = (
        ("sgd", {"optimizer": "sgd"}),
        ("sgd-momentum", {"optimizer": "sgd_momentum"}),
        ("adamw-fused", {"optimizer": "adamw_fused"}),
    )

    name: str = "adamw"
    """sgd, sgd_momentum, adamw or adamw_fused (CUDA only)."""
    lr: float = LR
    """Learning rate, the same for every optimizer so that runs differ in state only."""
    momentum: float = 0.9
    """Momentum for sgd_momentum."""

    def __post_init__(self) -> None:
        if self.name not in NAMES:
            raise ValueError(f"optimizer {self.name!r} is not one of {', '.join(NAMES)}")

    @classmethod
    def from_value(cls, value) -> OptimizerConfig:
        return cls(name=value)

    def to_value(self) -> str:
        return self.name

    def check(self, toggles) -> None:
        device = torch.device(toggles.device)
        if self.name == "adamw_fused" and device.type != "cuda":
            raise ValueError(f"optimizer adamw_fused needs a cuda device, got {device.type}")

    def apply(self, model: nn.Module) -> torch.optim.Optimizer:
        params = model.parameters()
        if self.name == "sgd":
            return torch.optim.SGD(params, lr=self.lr)
        if self.name == "sgd_momentum":
            return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum)
        return torch.optim.AdamW(params, lr=self.lr, fused=True if self.name == "adamw_fused" else None)
