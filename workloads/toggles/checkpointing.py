"""Activation checkpointing: keep fewer forward activations, recompute them in backward.

Each chosen Block's forward is replaced on the instance (not wrapped in a new
module, as torch.distributed's checkpoint_wrapper does) so that module paths such
as ``blocks.0.attn.qkv`` stay what the profiler attributes memory to. Non-reentrant
torch.utils.checkpoint (use_reentrant=False) is used throughout: it composes with
autocast, saved-tensor hooks (offload) and torch.compile, and re-runs the Block's
submodules inside backward, which the capture labels as the "recompute" phase.

Modes:
- full: every Block keeps only its input.
- every:k: every k-th Block (blocks 0, k, 2k, ...), as torchtitan's "every k" policy.
- selective: every Block, with torch.utils.checkpoint.create_selective_checkpoint_contexts
  (selective activation checkpointing, SAC): the outputs of the linear layers' matmuls
  (aten.mm / aten.addmm) are saved, everything else is recomputed in backward, chiefly
  the attention (SDPA) and the MLP's GELU, plus the cheap layer norms, casts and adds.
  Recomputing SDPA costs about one attention forward; recomputing a matmul would cost
  as much as the matmul, which is why those are the ones kept.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from workloads.toggles.base import Toggle

MODES = ("full", "every", "selective")


@dataclass(kw_only=True, slots=True)
class CheckpointConfig(Toggle):
    key = "checkpointing"
    stage = "model"
    cli = {"metavar": "full|every:k|selective"}
    ablation = (
        ("ckpt-full", {"checkpointing": "full"}),
        ("ckpt-every2", {"checkpointing": "every:2"}),
        ("ckpt-selective", {"checkpointing": "selective"}),
    )

    mode: str
    """"full", "every" (every k-th Block) or "selective" (recompute attention and activations)."""
    every: int = 1
    """k for mode "every": Blocks 0, k, 2k, ... are checkpointed."""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"checkpointing {self.mode!r} is not one of full, every:k, selective")
        if self.every < 1:
            raise ValueError(f"checkpointing every:{self.every}: k must be at least 1")
        if self.mode != "every" and self.every != 1:
            raise ValueError(f"checkpointing {self.mode} takes no k (got every={self.every})")
        if self.mode == "selective" and not _has_sac():
            raise ValueError(
                "checkpointing selective needs torch.utils.checkpoint."
                f"create_selective_checkpoint_contexts (torch >= 2.4); torch is {torch.__version__}"
            )

    @classmethod
    def parse(cls, text: str) -> CheckpointConfig:
        """ "full", "selective" or "every:k"."""
        mode, _, k = str(text).partition(":")
        if mode == "every":
            if not k.isdigit():
                raise ValueError(f"checkpointing {text!r}: expected every:k with a whole number k")
            return cls(mode="every", every=int(k))
        if k:
            raise ValueError(f"checkpointing {text!r}: only every:k takes a number")
        return cls(mode=mode)

    @classmethod
    def from_value(cls, value) -> CheckpointConfig:
        return cls.parse(value)

    def to_value(self) -> str:
        return str(self)

    def __str__(self) -> str:
        return f"every:{self.every}" if self.mode == "every" else self.mode

    def apply(self, model: nn.Module) -> nn.Module:
        """Checkpoint the model's Blocks in place (0, k, 2k, ... under every:k); returns the model."""
        context_fn = _selective_context if self.mode == "selective" else None
        step = self.every if self.mode == "every" else 1
        for i in range(0, len(model.blocks), step):
            _checkpoint_forward(model.blocks[i], context_fn)
        return model


def checkpoint_modules(modules) -> None:
    """Full activation checkpointing of each module's forward (its hooks stay outside,
    so FSDP's unshard runs before a recomputation, as with checkpoint_wrapper)."""
    for module in modules:
        _checkpoint_forward(module, None)


def _checkpoint_forward(block: nn.Module, context_fn) -> None:
    inner = block.forward  # the bound class method; Module.__call__ (and its hooks) stay outside
    kwargs = {"use_reentrant": False}
    if context_fn is not None:
        kwargs["context_fn"] = context_fn

    @functools.wraps(inner)
    def forward(*args, **kw):
        return checkpoint(inner, *args, **kw, **kwargs)

    block.forward = forward


def _has_sac() -> bool:
    from torch.utils import checkpoint as ckpt

    return hasattr(ckpt, "create_selective_checkpoint_contexts") and hasattr(ckpt, "CheckpointPolicy")


@functools.cache
def _saved_ops() -> frozenset:
    aten = torch.ops.aten
    # The linear layers' matmuls. Not bmm: on the math SDPA path that is attention's
    # own QK^T and AV, which selective checkpointing is meant to recompute.
    return frozenset({aten.mm.default, aten.addmm.default})


def _policy(ctx, op, *args, **kwargs):
    from torch.utils.checkpoint import CheckpointPolicy

    return CheckpointPolicy.MUST_SAVE if op in _saved_ops() else CheckpointPolicy.PREFER_RECOMPUTE


def _selective_context():
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    return create_selective_checkpoint_contexts(_policy)
