"""Training toggles: one module per memory/speed optimization, torchtitan-style.

Each module has a small config dataclass and an `apply(...)`; a toggle that is off
is None. `TrainToggles` holds them all, checks combinations at construction (so a
bad combination fails at start-up, not halfway through a run), and `apply_toggles`
applies them in one fixed order. `from_dict` reads the runner's flat dict:

    precision       "fp32" | "bf16" | "fp16"
    checkpointing   "full" | "every:k" | "selective"
    accumulation    k (micro-batches per optimizer step)
    optimizer       "sgd" | "sgd_momentum" | "adamw" | "adamw_fused"
    attention       "math" | "flash" | "efficient" | "cudnn"
    offload         "on" / true
    compile         "on" / true, or a backend name ("inductor", "aot_eager")
    alloc_conf      a PYTORCH_CUDA_ALLOC_CONF string

A missing key, None, False, "off" or "none" is off (and so are fp32 and accumulation 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from workloads.toggles.accumulation import AccumulationConfig
from workloads.toggles.allocator import AllocatorConfig
from workloads.toggles.attention import AttentionConfig
from workloads.toggles.checkpointing import CheckpointConfig
from workloads.toggles.compile import CompileConfig
from workloads.toggles.offload import OffloadConfig
from workloads.toggles.optimizer import OptimizerConfig
from workloads.toggles.plan import StepPlan
from workloads.toggles.precision import PrecisionConfig

__all__ = [
    "AccumulationConfig", "AllocatorConfig", "AttentionConfig", "CheckpointConfig", "CompileConfig",
    "KEYS", "OffloadConfig", "OptimizerConfig", "PrecisionConfig", "StepPlan", "TrainToggles",
    "apply_toggles", "from_dict",
]

_OFF_WORDS = ("off", "none", "false", "")
_ON_WORDS = ("on", "true")


@dataclass(kw_only=True, slots=True)
class TrainToggles:
    device: str = "cpu"
    """Where the run trains ("cpu", "cuda", "cuda:1"); several toggles exist only on cuda."""
    batch_size: int | None = None
    """Sequences per optimizer step, for the accumulation check (None skips it)."""
    precision: PrecisionConfig | None = None
    """Autocast dtype (None: fp32)."""
    checkpointing: CheckpointConfig | None = None
    """Which Blocks recompute their activations in backward (None: none)."""
    accumulation: AccumulationConfig | None = None
    """Micro-batches per optimizer step (None: one)."""
    optimizer: OptimizerConfig | None = None
    """The optimizer (None: AdamW)."""
    attention: AttentionConfig | None = None
    """A pinned SDPA backend (None: SDPA chooses)."""
    offload: OffloadConfig | None = None
    """Saved activations kept in host memory (None: on the device)."""
    compile: CompileConfig | None = None
    """torch.compile of the forward (None: eager)."""
    allocator: AllocatorConfig | None = None
    """The PYTORCH_CUDA_ALLOC_CONF the process must have (None: whatever it has)."""

    def __post_init__(self) -> None:
        device = torch.device(self.device)
        if self.precision:
            self.precision.check(device)
        if self.accumulation and self.batch_size is not None:
            self.accumulation.check(self.batch_size)
        if self.optimizer:
            self.optimizer.check(device)
        if self.attention:
            self.attention.check(device, half_precision=self.precision is not None)
        if self.allocator:
            self.allocator.check(device)

    def to_dict(self) -> dict:
        """The flat form, with off toggles left out; from_dict(to_dict()) round-trips."""
        out: dict = {}
        if self.precision:
            out["precision"] = self.precision.dtype
        if self.checkpointing:
            out["checkpointing"] = str(self.checkpointing)
        if self.accumulation:
            out["accumulation"] = self.accumulation.micro_batches
        if self.optimizer:
            out["optimizer"] = self.optimizer.name
        if self.attention:
            out["attention"] = self.attention.backend
        if self.offload:
            out["offload"] = "on"
        if self.compile:
            backend = self.compile.backend
            out["compile"] = "on" if backend == "inductor" else getattr(backend, "__name__", str(backend))
        if self.allocator:
            out["alloc_conf"] = self.allocator.alloc_conf
        return out


def _off(value) -> bool:
    # Identity, not equality, for the booleans: accumulation 0 or 1 is a number, not off.
    return value is None or value is False or (isinstance(value, str) and value.strip().lower() in _OFF_WORDS)


def _on(value) -> bool:
    return value is True or (isinstance(value, str) and value.strip().lower() in _ON_WORDS)


def _precision(v):
    return None if v == "fp32" else PrecisionConfig(dtype=v)


def _accumulation(v):
    try:
        k = int(v) if isinstance(v, str) else v
    except ValueError:
        raise ValueError(f"accumulation {v!r} is not a whole number") from None
    return None if k == 1 else AccumulationConfig(micro_batches=k)


def _offload(v):
    if _on(v):
        return OffloadConfig()
    raise ValueError(f"offload: expected on or off, got {v!r}")


def _compile(v):
    if _on(v):
        return CompileConfig()
    if isinstance(v, str):
        return CompileConfig(backend=v)  # a backend name: "inductor", "aot_eager", ...
    raise ValueError(f"compile: expected on, off or a backend name, got {v!r}")


_PARSERS = {
    "precision": ("precision", _precision),
    "checkpointing": ("checkpointing", CheckpointConfig.parse),
    "accumulation": ("accumulation", _accumulation),
    "optimizer": ("optimizer", lambda v: OptimizerConfig(name=v)),
    "attention": ("attention", lambda v: AttentionConfig(backend=v)),
    "offload": ("offload", _offload),
    "compile": ("compile", _compile),
    "alloc_conf": ("allocator", lambda v: AllocatorConfig(alloc_conf=v)),
}
KEYS = tuple(_PARSERS)


def from_dict(d: dict | None, *, device: str = "cpu", batch_size: int | None = None) -> TrainToggles:
    """TrainToggles from the runner's flat dict (see the module docstring for keys and values)."""
    d = dict(d or {})
    unknown = sorted(set(d) - set(_PARSERS))
    if unknown:
        raise ValueError(f"unknown training toggle(s) {', '.join(unknown)}; known: {', '.join(KEYS)}")
    fields = {}
    for key, value in d.items():
        if _off(value):
            continue
        field_name, parse = _PARSERS[key]
        fields[field_name] = parse(value)
    return TrainToggles(device=str(device), batch_size=batch_size, **fields)


def apply_toggles(toggles: TrainToggles, model: nn.Module) -> tuple[nn.Module, torch.optim.Optimizer, StepPlan]:
    """Apply every toggle to a freshly built model; returns (model, optimizer, step plan).

    The order is fixed, and matters:
    1. allocator first: it only checks the environment, and a run that would be
       mislabelled (the setting not in effect) must stop before it trains.
    2. the step-level toggles fill in the StepPlan. Their contexts nest in this order:
       the SDPA pin spans the whole step (forward, backward and the recompute that
       checkpointing does in backward); autocast, then save_on_cpu, wrap each forward
       (save_on_cpu then packs the tensors autocast produced).
    3. checkpointing replaces Block forwards before compile, so that dynamo traces the
       checkpointed Blocks (torchtitan's order: activation checkpointing, then compile).
    4. compile last among the model transforms: it must see the final forward.
    5. the optimizer after the model is final (the transforms keep the parameter
       objects; building it last keeps that from mattering).
    """
    device = torch.device(toggles.device)
    if toggles.allocator:
        toggles.allocator.apply()
    plan = StepPlan(device=device)
    for step_toggle in (toggles.attention, toggles.precision, toggles.offload, toggles.accumulation):
        if step_toggle is not None:
            step_toggle.apply(plan)
    if toggles.checkpointing:
        toggles.checkpointing.apply(model)
    if toggles.compile:
        model = toggles.compile.apply(model)
    optimizer = (toggles.optimizer or OptimizerConfig()).apply(model)
    return model, optimizer, plan
