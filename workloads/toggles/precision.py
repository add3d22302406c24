"""Mixed precision: forward under torch.autocast, and loss scaling for fp16.

Parameters, gradients and optimizer states stay fp32 (autocast casts weights per
op); matmul outputs, and so most activations, are in the low-precision dtype.
fp16's narrow exponent needs a GradScaler so that small gradients do not flush
to zero; bf16 has fp32's exponent and needs none.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from workloads.toggles.base import Toggle
from workloads.toggles.plan import StepPlan

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(kw_only=True, slots=True)
class PrecisionConfig(Toggle):
    key = "precision"
    stage = "step"
    flags = ("--precision", "--dtype")
    cli = {"choices": ["fp32", *DTYPES]}
    ablation = (("bf16", {"precision": "bf16"}), ("fp16", {"precision": "fp16"}))

    dtype: str
    """Autocast dtype: "bf16" or "fp16" (fp32 is the toggle's off, None)."""

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"precision {self.dtype!r} is not one of fp32, {', '.join(DTYPES)}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @classmethod
    def from_value(cls, value) -> PrecisionConfig | None:
        return None if value == "fp32" else cls(dtype=value)

    def to_value(self) -> str:
        return self.dtype

    def check(self, toggles) -> None:
        """Refuse fp16 where no GradScaler exists for the device (CPU before torch 2.3)."""
        device = torch.device(toggles.device)
        if self.dtype == "fp16" and not scaler_available(device):
            raise ValueError(
                f"precision fp16 needs torch.amp.GradScaler({device.type!r}), which "
                f"torch {torch.__version__} does not provide; use bf16 on {device.type}"
            )

    def apply(self, plan: StepPlan) -> None:
        dtype, device_type = self.torch_dtype, plan.device.type
        plan.forward_contexts.append(lambda: torch.autocast(device_type=device_type, dtype=dtype))
        if self.dtype == "fp16":
            plan.scaler = torch.amp.GradScaler(device_type)


def scaler_available(device: torch.device) -> bool:
    """Whether torch.amp.GradScaler works on `device` (it disables itself, with a warning, where not)."""
    if not hasattr(torch, "amp") or not hasattr(torch.amp, "GradScaler"):
        return False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.amp.GradScaler(device.type).is_enabled()
    except (RuntimeError, TypeError, ValueError):
        return False
