"""What an op's arguments hold, read fast enough to run on every op (the CPU backend's
dispatch mode), and the forward stack an autograd node is given.

An argument's kind is decided once per Python type: a plain tensor (tracked), a
list or tuple (looked into one level deep: aten takes Tensor[] and Tensor?[]; named
tuples come back from ops such as max), or anything else. A tensor subclass with a
dispatch of its own (fake tensors, functional wrappers) holds no storage of ours.

A node's forward stack is kept in its own `metadata` dict, which lives and dies with
the node: no table of nodes to prune, and no id that a later node could reuse.
"""

from __future__ import annotations

import torch

_PLAIN_DISPATCH = torch.Tensor.__torch_dispatch__
SITE_KEY = "vramscope_forward_stack_id"  # in an autograd node's metadata dict

OTHER, TENSOR, SEQUENCE = 0, 1, 2
KINDS: dict[type, int] = {}


def kind_of(cls: type) -> int:
    """OTHER, TENSOR or SEQUENCE, remembered in KINDS."""
    if issubclass(cls, torch.Tensor):
        # Subclasses with a dispatch of their own (fake tensors...) hold no storage of ours.
        kind = TENSOR if cls.__torch_dispatch__ is _PLAIN_DISPATCH else OTHER
    elif issubclass(cls, (list, tuple)):
        kind = SEQUENCE
    else:
        kind = OTHER
    KINDS[cls] = kind
    return kind


def tensors_in(args, kwargs) -> list:
    """The plain tensors among `args` and `kwargs` values, one level deep."""
    found = []
    kinds = KINDS
    for group in (args, kwargs.values()) if kwargs else (args,):
        for x in group:
            kind = kinds.get(type(x))
            if kind is None:
                kind = kind_of(type(x))
            if kind == TENSOR:
                found.append(x)
            elif kind == SEQUENCE:
                for y in x:
                    k = kinds.get(type(y))
                    if (k if k is not None else kind_of(type(y))) == TENSOR:
                        found.append(y)
    return found


def note_site(fn, stack_id: int | None) -> None:
    """Name the forward stack of autograd node `fn`, once."""
    if stack_id is not None:
        meta = fn.metadata
        if SITE_KEY not in meta:
            meta[SITE_KEY] = stack_id
