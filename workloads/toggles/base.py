"""What a training toggle declares, so that its registry entry makes it known everywhere.

A toggle is a config dataclass that also subclasses `Toggle`; on TrainToggles it is None
when off. Its class attributes say where it fits:

    key        its name in the runner's flat dict, and its workloads.train flag (--key)
    attr       its attribute on TrainToggles (default: the key)
    stage      when apply_toggles applies it:
                 "environment"  apply(): checks the process before anything is built
                 "step"         apply(plan): fills in the StepPlan a training step follows
                 "model"        apply(model) -> the model to train (checkpointing, compile)
                 "optimizer"    apply(model) -> the optimizer; off means the class's default
    flags      its workloads.train option strings (default: --key), and `cli` their argparse
               keyword arguments (choices, metavar: the values it takes); the help line is
               the first line of the toggle module's docstring
    ablation   (row name, toggles) rows that the seeds suite runs it in against the baseline
    cuda_only  why the ablation runner refuses it off CUDA without asking the workload, or None

and its methods turn the flat value into the config and back: `from_value(value)` (called
only with a value that is not off; None where the value means off, as fp32 or accumulation 1)
and `to_value()`; `check(toggles)` refuses what cannot run, given the device, the batch and
the other toggles.
"""

from __future__ import annotations

import sys
from typing import Any, ClassVar

STAGES = ("environment", "step", "model", "optimizer")
_OFF_WORDS = ("off", "none", "false", "")
_ON_WORDS = ("on", "true")


def is_off(value) -> bool:
    """A missing toggle, None, False, "off", "none", "false" or ""."""
    # Identity, not equality, for the booleans: accumulation 0 or 1 is a number, not off.
    return value is None or value is False or (isinstance(value, str) and value.strip().lower() in _OFF_WORDS)


def is_on(value) -> bool:
    return value is True or (isinstance(value, str) and value.strip().lower() in _ON_WORDS)


class Toggle:
    """Base of every toggle config; see the module docstring for what a subclass declares."""

    __slots__ = ()  # the dataclass subclasses keep their slots

    key: ClassVar[str]
    attr: ClassVar[str]
    stage: ClassVar[str]
    flags: ClassVar[tuple[str, ...]]
    cli: ClassVar[dict[str, Any]] = {}
    ablation: ClassVar[tuple[tuple[str, dict], ...]] = ()
    cuda_only: ClassVar[str | None] = None

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if cls.stage not in STAGES:
            raise TypeError(f"{cls.__name__}.stage {cls.stage!r} is not one of {', '.join(STAGES)}")
        if not hasattr(cls, "attr"):
            cls.attr = cls.key
        if not hasattr(cls, "flags"):
            cls.flags = ("--" + cls.key.replace("_", "-"),)

    @classmethod
    def from_value(cls, value) -> Toggle | None:
        raise NotImplementedError

    def to_value(self):
        raise NotImplementedError

    @classmethod
    def summary(cls) -> str:
        """The first line of the toggle module's docstring: what it does, for help texts."""
        doc = (sys.modules[cls.__module__].__doc__ or "").strip()
        return doc.splitlines()[0] if doc else cls.key

    def check(self, toggles) -> None:
        """Raise ValueError if this setting cannot run in `toggles` (a TrainToggles)."""
