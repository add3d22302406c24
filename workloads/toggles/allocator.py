"""CUDA caching-allocator settings (PYTORCH_CUDA_ALLOC_CONF), checked rather than set.

CUDA reads the variable once, when it initializes, so a run cannot change it:
the runner starts each configuration in a fresh process with the variable in its
environment (workloads/interface.md). This toggle records the intended setting
and verifies, before the model is built, that the process really has it; a run
labelled "expandable_segments" that silently ran without it would be worse than
one that fails.

Examples: "expandable_segments:True", "max_split_size_mb:128",
"garbage_collection_threshold:0.6", or several joined with commas.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from workloads.toggles.base import Toggle

ENV = "PYTORCH_CUDA_ALLOC_CONF"
ENV_ALIAS = "PYTORCH_ALLOC_CONF"  # torch's newer, device-neutral name for the same setting


def parse(conf: str) -> dict[str, str]:
    """ "a:1, b:2" -> {"a": "1", "b": "2"}; raises ValueError on anything not key:value."""
    out = {}
    for item in str(conf).split(","):
        key, sep, value = (s.strip() for s in item.partition(":"))
        if not item.strip():
            continue
        if not sep or not key or not value:
            raise ValueError(f"alloc_conf {conf!r}: {item.strip()!r} is not key:value")
        out[key] = value
    if not out:
        raise ValueError("alloc_conf is empty (leave it out for the allocator's defaults)")
    return out


@dataclass(kw_only=True, slots=True)
class AllocatorConfig(Toggle):
    key = "alloc_conf"
    attr = "allocator"
    stage = "environment"
    cli = {"metavar": "PYTORCH_CUDA_ALLOC_CONF"}
    ablation = (("expandable", {"alloc_conf": "expandable_segments:True"}),)
    cuda_only = "PYTORCH_CUDA_ALLOC_CONF configures the CUDA caching allocator"

    alloc_conf: str
    """The PYTORCH_CUDA_ALLOC_CONF value the runner must start this process with."""

    def __post_init__(self) -> None:
        parse(self.alloc_conf)  # a typo fails here, not as an allocator warning mid-run

    @classmethod
    def from_value(cls, value) -> AllocatorConfig:
        return cls(alloc_conf=value)

    def to_value(self) -> str:
        return self.alloc_conf

    def check(self, toggles) -> None:
        device = torch.device(toggles.device)
        if device.type != "cuda":
            raise ValueError(f"alloc_conf configures the CUDA caching allocator; the run is on {device.type}")

    def apply(self, environ: Mapping[str, str] | None = None) -> None:
        """Raise unless this process was started with the setting."""
        environ = os.environ if environ is None else environ
        name = ENV if environ.get(ENV) else ENV_ALIAS
        actual = environ.get(name)
        if actual is not None:
            try:
                if parse(actual) == parse(self.alloc_conf):
                    return
            except ValueError:
                pass
        raise RuntimeError(
            f"alloc_conf {self.alloc_conf!r} is not in effect: this process has {name}="
            f"{actual!r}. CUDA reads it once at start-up, so the runner must start the process "
            f"with {ENV}={self.alloc_conf!r} in its environment"
        )
