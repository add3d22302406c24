"""The torch.cat cache: K and V grow by concatenation, one new tensor per token.

The layout of transformers' DynamicCache. Each step allocates the grown tensor
and frees the old one, so the allocator sees a new, slightly larger block per
layer per token, and for a moment both are alive.
"""

from __future__ import annotations

import torch

from profiler import category
from workloads.kv.base import KV_CATEGORY, KVCache, KVSpec, attention_mask, tensor_bytes


class ConcatCache(KVCache):
    kind = "concat"

    def __init__(self, spec: KVSpec, batch: int) -> None:
        super().__init__(spec, batch)
        self.k: list[torch.Tensor | None] = [None] * spec.layers  # each (B, kv_heads, T, hd)
        self.v: list[torch.Tensor | None] = [None] * spec.layers

    def update(self, layer, k, v):
        T = self._check_new(layer, k, v)
        with category(KV_CATEGORY):
            if self.k[layer] is None:
                # A copy, not the view: the view would keep the whole qkv output alive.
                self.k[layer] = k.clone(memory_format=torch.contiguous_format)
                self.v[layer] = v.clone(memory_format=torch.contiguous_format)
            else:
                self.k[layer] = torch.cat([self.k[layer], k], dim=2)
                self.v[layer] = torch.cat([self.v[layer], v], dim=2)
        kv_len = self.k[layer].shape[2]
        return self.k[layer], self.v[layer], attention_mask(T, kv_len, k.device)

    def release(self) -> None:
        self.k = [None] * self.spec.layers
        self.v = [None] * self.spec.layers

    def token_state_bytes(self) -> int:
        return tensor_bytes(self.k + self.v)  # it holds nothing but token states

    def reserved_bytes(self) -> int:
        return tensor_bytes(self.k + self.v)
