"""KV caches for decode, one module per layout, all speaking the KV protocol.

    cache = make_cache("paged", spec, batch=8, block_size=16)

CACHES is the registry: a layout is its module (a KVCache subclass naming its `kind`)
plus one entry there. The infer workload's kv toggle, the ablation's kv suite and
make_cache read their kinds from it; each module's docstring says what its layout keeps.
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
    c.kind: c
    for c in (
        ConcatCache,
        PreallocCache,
        SlidingCache,
        PagedCache,
        Int8Cache,
    )
}
KINDS = tuple(CACHES)

__all__ = [
    "CACHES",
    "KINDS",
    "BlockPool",
    "ConcatCache",
    "Int8Cache",
    "KVCache",
    "KVSpec",
    "PagedCache",
    "PreallocCache",
    "RaggedBatch",
    "SlidingCache",
    "attention_mask",
    "make_cache",
]


def make_cache(
    kind: str,
    spec: KVSpec,
    batch: int,
    *,
    max_len: int | None = None,
    window: int | None = None,
    block_size: int | None = None,
    pool: BlockPool | None = None,
) -> KVCache:
    """A cache of `kind`; max_len is required for prealloc, window for sliding;
    block_size (default 16) and an optional shared pool apply to paged."""
    if kind not in CACHES:
        raise ValueError(f"unknown KV cache kind {kind!r}; known kinds: {', '.join(KINDS)}")
    return CACHES[kind].create(spec, batch, max_len=max_len, window=window, block_size=block_size, pool=pool)
