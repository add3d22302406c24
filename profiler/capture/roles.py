"""Which tensors are parameters, gradients and optimizer states, by storage address.

A role row says: the allocation live at `addr` at stream position `event_index`
has this role. Negative positions refer to a marker (see profiler.trace.finalize.markers).
Runs at every optimizer step, so it avoids building storage objects.
"""

from __future__ import annotations

import time

import torch


def param_name(p, names, index) -> str:
    return names.get(id(p)) or f"param{index}"


def named_grads(optimizer, names):
    i = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is not None:
                yield f"{param_name(p, names, i)}.grad", p.grad
            i += 1


def named_states(optimizer, names, known: dict | None = None):
    """(name, tensor) of the optimizer's state tensors. With `known` ((param id, key) -> data
    pointer, updated here), only those not seen at their current place: states live across
    steps and need registering once, and this runs at every step."""
    for i, (p, state) in enumerate(optimizer.state.items()):
        for key, value in state.items():
            if not isinstance(value, torch.Tensor):
                continue
            if known is not None:
                ptr = local_tensor(value).data_ptr()
                if known.get((id(p), key)) == ptr:
                    continue
                known[(id(p), key)] = ptr
            yield f"{param_name(p, names, i)}.{key}", value


def local_tensor(t):
    """The tensor that owns `t`'s storage: a DTensor's (FSDP2's sharded parameters, gradients
    and states) local shard, else `t`. The type test spares plain tensors a failed lookup."""
    return t if type(t) in _PLAIN else getattr(t, "_local_tensor", t)


def tensor_roles(named, role, device_type, event_index, step, known=None) -> dict | None:
    """Role rows for the backend's device; one row per distinct storage.

    `known` (name -> data pointer) skips tensors already registered at the same place.
    """
    names: list[str] = []
    addrs: list[int] = []
    sizes: list[int] = []
    seen = set()
    for name, t in named:
        t = local_tensor(t)
        ptr = t.data_ptr()
        if known is not None and known.get(name) == ptr:
            continue
        if t.device.type != device_type:
            continue
        # The storage's start without building a storage object (a hot path each step).
        offset = t.storage_offset()
        addr = ptr - offset * t.element_size() if offset else ptr
        if addr in seen or addr == 0:
            continue
        seen.add(addr)
        if known is not None:
            known[name] = ptr
        names.append(name)
        addrs.append(addr)
        sizes.append(t.nbytes)
    if not addrs:
        return None
    n = len(addrs)
    now = time.time_ns() // 1000
    return dict(
        ts_us=[now] * n,
        event_index=[event_index] * n,
        step=[step] * n,
        addr=addrs,
        size_bytes=sizes,
        role=[role] * n,
        name=names,
    )


_PLAIN = (torch.Tensor, torch.nn.Parameter)
