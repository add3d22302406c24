"""The KV-cache protocol: how a cache reports its memory to the profiler.

A cache implements `kv_stats() -> dict` with `batch`, `tokens`,
`token_state_bytes` (bytes holding real K and V states), `reserved_bytes`
(everything the cache holds for K and V, used or not) and optionally
`extra_bytes` (scales, block tables). transformers' Cache objects are measured
from their tensors without any change to the model.
"""

from __future__ import annotations

import torch


def kv_row(cache, name: str | None = None) -> dict | None:
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
    tensors = list(_hf_cache_tensors(cache))
    if not tensors:
        return None
    # A DynamicCache grows by concatenation: what it holds is exactly its token states.
    held = sum(t.numel() * t.element_size() for t in tensors)
    k = tensors[0]
    return dict(
        cache=name or type(cache).__name__,
        batch=int(k.shape[0]),
        tokens=int(k.shape[-2]),
        token_state_bytes=held,
        reserved_bytes=held,
        extra_bytes=0,
    )


def _hf_cache_tensors(cache):
    """K and V tensors of a transformers Cache, across its layouts over versions."""
    layers = getattr(cache, "layers", None)
    if layers is not None:  # transformers >= 4.54: a list of layer caches
        for layer in layers:
            for attr in ("keys", "values"):
                t = getattr(layer, attr, None)
                if isinstance(t, torch.Tensor) and t.numel():
                    yield t
        return
    for attr in ("key_cache", "value_cache"):  # older DynamicCache
        for t in getattr(cache, attr, None) or ():
            if isinstance(t, torch.Tensor) and t.numel():
                yield t
