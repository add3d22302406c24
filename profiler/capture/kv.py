"""The KV-cache protocol: how a cache reports its memory to the profiler.

A cache implements `kv_stats() -> dict` with `batch`, `tokens`,
`token_state_bytes` (bytes holding real K and V states), `reserved_bytes`
(everything the cache holds for K and V, used or not) and optionally
`extra_bytes` (scales, block tables). transformers' Cache objects are measured
from their tensors without any change to the model:

- a layer that grows by concatenation (DynamicLayer) holds exactly its token states;
- a preallocated layer (StaticLayer and its sliding variant, which have `max_cache_len`)
  holds all its positions but only `get_seq_length()` of them are filled: token states
  count the filled positions, reserved bytes the whole preallocation;
- reserved bytes are the bytes of the storages under the K and V tensors, so a layer that
  keeps a view of a larger tensor (the sliding DynamicLayer) reserves what it keeps alive.

Quantized layers keep their states in `_quantized_keys`/`_quantized_values`, in layouts that
differ by backend; only their plain K and V tensors (the residual window) are measured.

A capture measures each cache at every decode forward's end. Given the native tracker's
`kv_bytes` (`native=`), the layers' tensors are measured in one C++ call: the same figures
as the loop here, without its half a dozen Python calls a tensor (bench/README.md).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TypeGuard

import torch


def kv_row(cache, name: str | None = None, native=None) -> dict | None:
    """A kv table row for `cache` now, or None (no states yet, not a cache we know).
    `native`: the tracker's kv_bytes, for transformers' layer lists."""
    stats = getattr(cache, "kv_stats", None)
    if callable(stats):
        s = stats()
        return dict(
            cache=name or type(cache).__name__,
            batch=int(s.get("batch", 0)),
            tokens=int(s["tokens"]),
            token_state_bytes=int(s["token_state_bytes"]),
            reserved_bytes=int(s["reserved_bytes"]),
            extra_bytes=int(s.get("extra_bytes", 0)),
        )
    if native is not None and getattr(cache, "layers", None) is not None:
        facts = native([(getattr(x, "keys", None), getattr(x, "values", None), _filled(x)) for x in cache.layers])
        if facts is not None:  # None: no states, or a tensor without a storage of its own
            _, batch, tokens, token_state, reserved = facts
            return dict(
                cache=name or type(cache).__name__,
                batch=batch,
                tokens=tokens,
                token_state_bytes=token_state,
                reserved_bytes=reserved,
                extra_bytes=0,
            )
    layers = list(_hf_layers(cache))
    if not layers:
        return None
    # Runs after every decode forward: a few tensor calls per layer (each ~0.1-0.2 us).
    token_state = reserved = tokens = 0
    storages: set[tuple[int, int]] = set()
    for k, v, filled in layers:
        tokens = max(tokens, filled)
        for t in (k, v):
            token_state += filled * (t.nbytes // t.shape[-2])  # bytes of one position
            storage = t.untyped_storage()
            key = (t.get_device(), storage.data_ptr())  # get_device: an int, cheaper than str(device)
            if key not in storages:  # K and V of one layer never share, but views might
                storages.add(key)
                reserved += storage.nbytes()
    return dict(
        cache=name or type(cache).__name__,
        batch=int(layers[0][0].shape[0]),
        tokens=tokens,
        token_state_bytes=token_state,
        reserved_bytes=reserved,
        extra_bytes=0,
    )


def kv_shapes(cache) -> dict | None:
    """The facts of the formula layers x 2 x tokens x kv_heads x head_dim x dtype_bytes x batch
    for a transformers Cache whose layers all hold (batch, kv_heads, positions, head_dim) K and V
    of one shape and dtype; None otherwise (mixed layers, other layouts, no states yet)."""
    layers = list(_hf_layers(cache))
    if not layers:
        return None
    facts = set()
    for k, v, _ in layers:
        if k.dim() != 4 or v.dim() != 4:
            return None
        facts.add((k.shape[0], k.shape[1], k.shape[3], k.element_size()))
        facts.add((v.shape[0], v.shape[1], v.shape[3], v.element_size()))
    if len(facts) != 1:
        return None
    batch, kv_heads, head_dim, dtype_bytes = (int(x) for x in facts.pop())
    return dict(layers=len(layers), kv_heads=kv_heads, head_dim=head_dim, dtype_bytes=dtype_bytes, batch=batch)


def _states(t) -> TypeGuard[torch.Tensor]:
    return isinstance(t, torch.Tensor) and t.dim() >= 2 and t.numel() > 0


def _filled(layer) -> int:
    """A preallocated layer's filled positions (get_seq_length), -1 for all of them."""
    if getattr(layer, "max_cache_len", None) is None:
        return -1
    try:
        return int(layer.get_seq_length())
    except Exception:  # an unknown layer kind: count it as full
        return -1


def _hf_layers(cache) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
    """(K, V, filled positions) of each layer of a transformers Cache that holds states,
    across its layouts over versions."""
    layers = getattr(cache, "layers", None)
    if layers is not None:  # transformers >= 4.54: a list of layer caches
        for layer in layers:
            k, v = getattr(layer, "keys", None), getattr(layer, "values", None)
            if not (_states(k) and _states(v)):
                continue
            positions, filled = k.shape[-2], _filled(layer)  # preallocated: filled up to its length
            yield k, v, positions if filled < 0 else min(filled, positions)
        return
    keys, values = getattr(cache, "key_cache", None) or (), getattr(cache, "value_cache", None) or ()
    for k, v in zip(keys, values):  # older DynamicCache
        if _states(k) and _states(v):
            yield k, v, int(k.shape[-2])
