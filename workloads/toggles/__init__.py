"""Training toggles: one module per memory/speed optimization, torchtitan-style.

Each module has a small config dataclass (a `Toggle`, workloads/toggles/base.py) and an
`apply(...)`; a toggle that is off is None. TOGGLES below is the registry: a toggle is its
module plus one entry there, and everything else is derived from it: `TrainToggles` has one
attribute per toggle and checks combinations at construction (so a bad combination fails at
start-up, not halfway through a run), `from_dict` reads the runner's flat dict, `to_dict`
writes it back, `apply_toggles` applies them by stage, workloads.train has a flag per toggle
(`python -m workloads.train --help` lists the keys and their values) and the ablation
runner's seeds suite a row per toggle setting.

A missing key, None, False, "off" or "none" is off (and so are fp32 and accumulation 1).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from workloads.toggles.accumulation import AccumulationConfig
from workloads.toggles.allocator import AllocatorConfig
from workloads.toggles.attention import AttentionConfig
from workloads.toggles.base import STAGES, Toggle, is_off
from workloads.toggles.checkpointing import CheckpointConfig
from workloads.toggles.compile import CompileConfig
from workloads.toggles.offload import OffloadConfig
from workloads.toggles.optimizer import OptimizerConfig
from workloads.toggles.plan import StepPlan
from workloads.toggles.precision import PrecisionConfig

__all__ = [
    "AccumulationConfig",
    "AllocatorConfig",
    "AttentionConfig",
    "CheckpointConfig",
    "CompileConfig",
    "KEYS",
    "OffloadConfig",
    "OptimizerConfig",
    "PrecisionConfig",
    "StepPlan",
    "TOGGLES",
    "Toggle",
    "TrainToggles",
    "apply_toggles",
    "by_key",
    "from_dict",
]

# The registry. Its order is the order toggles are checked, listed and, within a stage, applied in:
# precision's autocast must wrap the forward outside offload's saved-tensor hooks.
TOGGLES: tuple[type[Toggle], ...] = (
    PrecisionConfig,
    CheckpointConfig,
    AccumulationConfig,
    OptimizerConfig,
    AttentionConfig,
    OffloadConfig,
    CompileConfig,
    AllocatorConfig,
)
KEYS = tuple(t.key for t in TOGGLES)


def by_key(key: str) -> type[Toggle]:
    for toggle in TOGGLES:
        if toggle.key == key:
            return toggle
    raise KeyError(key)


class _ToggleSet:
    """The methods of TrainToggles; its fields come from the registry."""

    __slots__ = ()

    def __post_init__(self) -> None:
        for toggle in TOGGLES:
            setting = getattr(self, toggle.attr)
            if setting is not None:
                setting.check(self)

    def enabled(self) -> list[Toggle]:
        """The settings that are on, in registry order."""
        return [s for s in (getattr(self, t.attr) for t in TOGGLES) if s is not None]

    def to_dict(self) -> dict:
        """The flat form, with off toggles left out; from_dict(to_dict()) round-trips."""
        return {setting.key: setting.to_value() for setting in self.enabled()}


_TRAIN_TOGGLES_DOC = """Every training toggle, None where off, one attribute per TOGGLES entry (its `attr`).

device: where the run trains ("cpu", "cuda", "cuda:1"); several toggles exist only on cuda.
batch_size: sequences per optimizer step, for the accumulation check (None skips it).
"""

# A dataclass built from the registry, so that a new toggle needs no field written here.
TrainToggles = dataclasses.make_dataclass(
    "TrainToggles",
    [
        ("device", str, dataclasses.field(default="cpu")),
        ("batch_size", int | None, dataclasses.field(default=None)),
        *[(t.attr, t | None, dataclasses.field(default=None)) for t in TOGGLES],
    ],
    bases=(_ToggleSet,),
    kw_only=True,
    slots=True,
    namespace={"__module__": __name__, "__doc__": _TRAIN_TOGGLES_DOC},
)


def from_dict(d: dict | None, *, device: str = "cpu", batch_size: int | None = None) -> TrainToggles:
    """TrainToggles from the runner's flat dict (keys: KEYS; values: each toggle's from_value)."""
    d = dict(d or {})
    unknown = sorted(set(d) - set(KEYS))
    if unknown:
        raise ValueError(f"unknown training toggle(s) {', '.join(unknown)}; known: {', '.join(KEYS)}")
    fields = {}
    for key, value in d.items():
        if is_off(value):
            continue
        toggle = by_key(key)
        fields[toggle.attr] = toggle.from_value(value)
    return TrainToggles(device=str(device), batch_size=batch_size, **fields)


def apply_toggles(toggles: TrainToggles, model: nn.Module) -> tuple[nn.Module, torch.optim.Optimizer, StepPlan]:
    """Apply every toggle to a freshly built model; returns (model, optimizer, step plan).

    By stage (base.STAGES), and within a stage in registry order; the order matters:
    1. environment first (the allocator): it only checks the process, and a run that would
       be mislabelled (the setting not in effect) must stop before it trains.
    2. the step-level toggles fill in the StepPlan. Their contexts nest in this order:
       the SDPA pin spans the whole step (forward, backward and the recompute that
       checkpointing does in backward); autocast, then save_on_cpu, wrap each forward
       (save_on_cpu then packs the tensors autocast produced).
    3. the model transforms: checkpointing replaces Block forwards before compile, so that
       dynamo traces the checkpointed Blocks (torchtitan's order: activation checkpointing,
       then compile); compile last, since it must see the final forward.
    4. the optimizer after the model is final (the transforms keep the parameter
       objects; building it last keeps that from mattering).
    """
    plan = StepPlan(device=torch.device(toggles.device))
    staged = {stage: [(t, getattr(toggles, t.attr)) for t in TOGGLES if t.stage == stage] for stage in STAGES}
    for _, setting in staged["environment"]:
        if setting is not None:
            setting.apply()
    for _, setting in staged["step"]:
        if setting is not None:
            setting.apply(plan)
    for _, setting in staged["model"]:
        if setting is not None:
            model = setting.apply(model)
    ((optimizer_toggle, setting),) = staged["optimizer"]  # exactly one: off is its default
    optimizer = (setting or optimizer_toggle()).apply(model)
    return model, optimizer, plan
