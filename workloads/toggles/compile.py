"""torch.compile of the whole model's forward (default mode).

The model's `forward` is replaced on the instance by its compiled version, rather
than wrapping the model in an OptimizedModule (whose `_orig_mod.` prefix would
rename every module path) or calling `model.compile()` (which compiles
`Module._call_impl`, so the profiler would never see the root module's call).

Module hooks and compile do not mix: the profiler's module tracer wraps every
Module._call_impl, and dynamo, tracing through it, breaks the graph at each module
call and hits its recompile limit within the first step (measured on torch 2.13:
2-16 node graphs, then "recompile_limit" in the tracer's _pre_forward).
workloads.train.run therefore captures compiled runs without module hooks:
allocations keep their phases and categories, not their modules. Under the CPU capture
backend (a TorchDispatchMode) dynamo does not compile at all, so run() refuses
compile on the CPU; the Trainer alone (no capture) compiles there fine.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from workloads.toggles.base import Toggle, is_on

# Modes that add CUDA graphs are left out: a graph replays its allocations from a
# private pool, so the allocator history would no longer show a step's allocations.
MODES = (None, "default", "max-autotune-no-cudagraphs")


@dataclass(kw_only=True, slots=True)
class CompileConfig(Toggle):
    key = "compile"
    stage = "model"
    cli = {"nargs": "?", "const": "on", "metavar": "BACKEND"}
    ablation = (("compile", {"compile": "on"}),)
    cuda_only = "train.run refuses compile under the CPU capture, where dynamo does not compile"

    backend: str | Callable = "inductor"
    """torch.compile backend: a name ("aot_eager" traces the same graphs without generating
    code, fast enough for CPU tests) or a backend callable."""
    mode: str | None = None
    """torch.compile mode: None/"default" or "max-autotune-no-cudagraphs"."""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(
                f"compile mode {self.mode!r} is not one of {', '.join(map(str, MODES))} "
                "(CUDA-graph modes hide per-step allocations from the capture)"
            )
        if not (callable(self.backend) or (isinstance(self.backend, str) and self.backend)):
            raise ValueError(f"compile backend must be a name such as 'inductor', got {self.backend!r}")

    @classmethod
    def from_value(cls, value) -> CompileConfig:
        if is_on(value):
            return cls()
        if isinstance(value, str):
            return cls(backend=value)  # a backend name: "inductor", "aot_eager", ...
        raise ValueError(f"compile: expected on, off or a backend name, got {value!r}")

    def to_value(self) -> str:
        backend = self.backend
        return "on" if backend == "inductor" else getattr(backend, "__name__", str(backend))

    def apply(self, model: nn.Module) -> nn.Module:
        model.forward = torch.compile(model.forward, backend=self.backend, mode=self.mode)
        return model
