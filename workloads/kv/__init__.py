"""KV caches for decode, one module per layout, all speaking the KV protocol.

    cache = make_cache("paged", spec, batch=8, block_size=16)

Kinds: concat (torch.cat growth), prealloc (max_len reserved once), sliding
(ring of `window` tokens), paged (blocks on demand), int8 (quantized, with scales).
"""

from __future__ import annotations

from workloads.kv.base import KVCache, KVSpec, attention_mask
from workloads.kv.concat import ConcatCache
from workloads.kv.int8 import Int8Cache
from workloads.kv.paged import BlockPool, PagedCache
from workloads.kv.prealloc import PreallocCache
from workloads.kv.ragged import RaggedBatch
from workloads.kv.sliding import SlidingCache

CACHES: dict[str, type[KVCache]] = {
    c.kind: c for c in (ConcatCache, PreallocCache, SlidingCache, PagedCache, Int8Cache)
}
KINDS = tuple(CACHES)

__all__ = ["KINDS", "BlockPool", "ConcatCache", "Int8Cache", "KVCache", "KVSpec", "PagedCache",
           "PreallocCache", "RaggedBatch", "SlidingCache", "attention_mask", "make_cache"]


def make_cache(kind: str, spec: KVSpec, batch: int, *, max_len: int | None = None,
               window: int | None = None, block_size: int | None = None,
               pool: BlockPool | None = None) -> KVCache:
    """A cache of `kind`; max_len is required for prealloc, window for sliding;
    block_size (default 16) and an optional shared pool apply to paged."""
    if kind == "concat":
        return ConcatCache(spec, batch)
    if kind == "prealloc":
        if max_len is None:
            raise ValueError("a prealloc cache needs max_len")
        return PreallocCache(spec, batch, max_len)
    if kind == "sliding":
        if window is None:
            raise ValueError("a sliding cache needs window")
        return SlidingCache(spec, batch, window)
    if kind == "paged":
        return PagedCache(spec, batch, block_size or (pool.block_size if pool else 16), pool)
    if kind == "int8":
        return Int8Cache(spec, batch)
    raise ValueError(f"unknown KV cache kind {kind!r}; known kinds: {', '.join(KINDS)}")
