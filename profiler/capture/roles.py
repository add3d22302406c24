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


def named_states(optimizer, names):
    for i, (p, state) in enumerate(optimizer.state.items()):
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                yield f"{param_name(p, names, i)}.{key}", value


def tensor_roles(named, role, device_type, event_index, step, known=None) -> dict | None:
    """Role rows for the backend's device; one row per distinct storage.

    `known` (name -> addr) skips tensors already registered at the same address:
    optimizer states live across steps and need registering once.
    """
    now = time.time_ns() // 1000
    seen = set()
    cols: dict[str, list] = {k: [] for k in ("ts_us", "event_index", "step", "addr", "size_bytes", "role", "name")}
    for name, t in named:
        # A DTensor (FSDP2's sharded parameters, gradients and states) owns no storage:
        # its local shard does.
        t = getattr(t, "_local_tensor", t)
        if t.device.type != device_type:
            continue
        # The storage's start without building a storage object (a hot path each step).
        addr = t.data_ptr() - t.storage_offset() * t.element_size()
        if addr in seen or addr == 0 or (known is not None and known.get(name) == addr):
            continue
        seen.add(addr)
        if known is not None:
            known[name] = addr
        for k, v in (
            ("ts_us", now),
            ("event_index", event_index),
            ("step", step),
            ("addr", addr),
            ("size_bytes", t.nbytes),
            ("role", role),
            ("name", name),
        ):
            cols[k].append(v)
    return cols if cols["addr"] else None
