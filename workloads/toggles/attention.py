"""Pin scaled_dot_product_attention to one backend with torch.nn.attention.sdpa_kernel.

Unpinned, SDPA picks a kernel per call (flash, memory-efficient, cuDNN or math),
and the choice changes what attention keeps for backward: math saves the
(B, nh, T, T) attention matrix, the fused kernels only the output and a logsumexp.
The pin spans forward and backward: activation checkpointing re-runs forward
inside backward, and must pick the same kernel (the saved tensors must match).
sdpa_kernel sets global flags, so autograd's worker threads see them too.

Backends by device: CUDA has all four; flash and cuDNN take fp16/bf16 only, so
they need a precision toggle. The CPU has math and flash (its own fused kernel).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workloads.toggles.base import Toggle
from workloads.toggles.plan import StepPlan

BACKENDS = ("math", "flash", "efficient", "cudnn")
_DEVICE_BACKENDS = {"cpu": ("math", "flash"), "cuda": BACKENDS}
_HALF_ONLY = ("flash", "cudnn")


def sdp_backend(name: str):
    from torch.nn.attention import SDPBackend

    return {
        "math": SDPBackend.MATH,
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
    }[name]


@dataclass(kw_only=True, slots=True)
class AttentionConfig(Toggle):
    key = "attention"
    stage = "step"
    cli = {"choices": list(BACKENDS)}
    ablation = (
        ("bf16+attn-flash", {"precision": "bf16", "attention": "flash"}),  # flash takes no fp32 on CUDA
        ("attn-efficient", {"attention": "efficient"}),
    )

    backend: str
    """math, flash, efficient or cudnn (off, None, lets SDPA choose)."""

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"attention {self.backend!r} is not one of {', '.join(BACKENDS)}")

    @classmethod
    def from_value(cls, value) -> AttentionConfig:
        return cls(backend=value)

    def to_value(self) -> str:
        return self.backend

    def check(self, toggles) -> None:
        device, half_precision = torch.device(toggles.device), toggles.precision is not None
        allowed = _DEVICE_BACKENDS.get(device.type, ("math",))
        if self.backend not in allowed:
            raise ValueError(
                f"attention {self.backend} does not run on {device.type}; there use {' or '.join(allowed)}"
            )
        if device.type == "cuda" and self.backend in _HALF_ONLY and not half_precision:
            raise ValueError(
                f"attention {self.backend} takes fp16/bf16 inputs only on cuda: set precision bf16 or fp16"
            )

    def apply(self, plan: StepPlan) -> None:
        from torch.nn.attention import sdpa_kernel

        backend = sdp_backend(self.backend)
        plan.step_contexts.append(lambda: sdpa_kernel([backend]))
