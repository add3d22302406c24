"""The paged cache: fixed-size blocks allocated on demand, found through a block table.

As in vLLM's PagedAttention, a sequence's K and V live in blocks of `block_size`
tokens. A block is one tensor (layers, 2, kv_heads, block_size, head_dim) holding
K and V of every layer for those tokens; the pool allocates it when a sequence
first needs it and releases it to the allocator when the sequence ends. So what a
sequence reserves beyond its tokens is only the unfilled tail of its last block.

Without a paged attention kernel, `update` gathers a layer's blocks into one
contiguous (B, kv_heads, T, head_dim) copy per step: a temporary that a fused
kernel would not need, and that shows up in the profile as such.
"""

from __future__ import annotations

import torch

from profiler import category
from workloads.kv.base import KV_CATEGORY, KVCache, KVSpec, attention_mask, tensor_bytes


class BlockPool:
    """Allocates and frees blocks; several caches (one per request) may share one pool."""

    def __init__(self, spec: KVSpec, block_size: int) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.spec = spec
        self.block_size = block_size
        self.blocks: dict[int, torch.Tensor] = {}  # block id -> storage
        self._next_id = 0

    @property
    def blocks_allocated(self) -> int:
        return len(self.blocks)

    @property
    def block_bytes(self) -> int:
        return self.block_size * self.spec.token_bytes

    def allocate(self) -> int:
        s = self.spec
        with category(KV_CATEGORY):
            block = torch.empty((s.layers, 2, s.kv_heads, self.block_size, s.head_dim), dtype=s.dtype, device=s.device)
        block_id, self._next_id = self._next_id, self._next_id + 1
        self.blocks[block_id] = block
        return block_id

    def free(self, block_ids) -> None:
        for i in block_ids:
            del self.blocks[i]


class PagedCache(KVCache):
    kind = "paged"

    def __init__(self, spec: KVSpec, batch: int, block_size: int = 16, pool: BlockPool | None = None) -> None:
        super().__init__(spec, batch)
        self.pool = pool or BlockPool(spec, block_size)
        if self.pool.block_size != block_size:
            raise ValueError(f"block_size={block_size} differs from the pool's {self.pool.block_size}")
        self.block_size = block_size
        self.block_table: list[list[int]] = [[] for _ in range(batch)]  # per sequence: block ids
        # Per layer, K and V: one list per sequence of its blocks' (kv_heads, bs, hd) views,
        # kept so that a step's gather does not re-slice every block.
        self._views = [([[] for _ in range(batch)], [[] for _ in range(batch)]) for _ in range(spec.layers)]

    @classmethod
    def create(cls, spec, batch, *, block_size=None, pool=None, **_) -> PagedCache:
        """block_size defaults to the shared pool's, else 16."""
        return cls(spec, batch, block_size or (pool.block_size if pool else 16), pool)

    @property
    def blocks_allocated(self) -> int:
        return sum(len(t) for t in self.block_table)

    def _reserve(self, tokens: int) -> None:
        need = -(-tokens // self.block_size)
        for b, table in enumerate(self.block_table):
            while len(table) < need:
                block_id = self.pool.allocate()
                table.append(block_id)
                block = self.pool.blocks[block_id]
                for layer, (ks, vs) in enumerate(self._views):
                    ks[b].append(block[layer, 0])
                    vs[b].append(block[layer, 1])

    def update(self, layer, k, v):
        T = self._check_new(layer, k, v)
        start, end, bs = self.seen, self.seen + T, self.block_size
        self._reserve(end)
        ks, vs = self._views[layer]
        for i in range(start // bs, (end - 1) // bs + 1):  # the blocks that the new tokens touch
            lo, hi = max(start, i * bs), min(end, (i + 1) * bs)
            for b in range(self.batch):
                ks[b][i][:, lo - i * bs : hi - i * bs].copy_(k[b, :, lo - start : hi - start])
                vs[b][i][:, lo - i * bs : hi - i * bs].copy_(v[b, :, lo - start : hi - start])
        mask = attention_mask(T, end, k.device)
        if start == 0:
            return k, v, mask  # nothing older to gather
        return self._gather(ks, end), self._gather(vs, end), mask

    def _gather(self, views, end: int) -> torch.Tensor:
        """One layer's K or V as (B, kv_heads, end, head_dim), copied out of the blocks."""
        flat = [blk for seq in views for blk in seq]
        s, nb = self.spec, len(views[0])
        x = torch.cat(flat, dim=1)  # (kv_heads, B * nb * bs, hd)
        x = x.view(s.kv_heads, self.batch, nb * self.block_size, s.head_dim).transpose(0, 1)
        return x[:, :, :end]

    def release(self) -> None:
        for table in self.block_table:
            self.pool.free(table)
        self.block_table = [[] for _ in range(self.batch)]
        self._views = [
            ([[] for _ in range(self.batch)], [[] for _ in range(self.batch)]) for _ in range(self.spec.layers)
        ]

    def _blocks(self) -> list[torch.Tensor]:
        return [self.pool.blocks[i] for table in self.block_table for i in table]

    def token_state_bytes(self) -> int:
        blocks = self._blocks()
        if not blocks:
            return 0
        per_position = tensor_bytes(blocks[:1]) // self.block_size  # one token, every layer
        return self.batch * self.tokens * per_position

    def reserved_bytes(self) -> int:
        return tensor_bytes(self._blocks())
