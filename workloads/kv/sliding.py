"""The sliding-window cache: a ring buffer of the last `window` tokens per layer.

Attention sees only the window: a decoded token attends to itself and the
window - 1 tokens before it. The ring is allocated once, so memory stops growing
at `window` tokens however long the sequence gets. Keys are stored in ring order,
not position order, which attention does not care about: positions are already
in K (absolute embeddings, or RoPE applied before caching).
"""

from __future__ import annotations

import torch

from workloads.kv.base import FixedKV, KVSpec, attention_mask


class SlidingCache(FixedKV):
    kind = "sliding"

    def __init__(self, spec: KVSpec, batch: int, window: int) -> None:
        super().__init__(spec, batch, window)
        self.window = window

    @classmethod
    def create(cls, spec, batch, *, window=None, **_) -> SlidingCache:
        if window is None:
            raise ValueError("a sliding cache needs window")
        return cls(spec, batch, window)

    @property
    def tokens(self) -> int:
        return min(self.seen, self.window)

    def update(self, layer, k, v):
        T = self._check_new(layer, k, v)
        ring_k, ring_v, w, held = self.k[layer], self.v[layer], self.window, self.tokens
        if T == 1:  # decode: overwrite the oldest slot, attend over the whole ring
            slot = self.seen % w
            ring_k[:, :, slot : slot + 1].copy_(k)
            ring_v[:, :, slot : slot + 1].copy_(v)
            n = min(self.seen + 1, w)
            return ring_k[:, :, :n], ring_v[:, :, :n], None
        # Several new tokens (a prefill): attend over the held window plus the new
        # tokens in position order, with a banded causal mask; then keep the last w.
        if held:
            order = torch.arange(self.seen - held, self.seen, device=k.device) % w
            k_all = torch.cat([ring_k.index_select(2, order), k], dim=2)
            v_all = torch.cat([ring_v.index_select(2, order), v], dim=2)
        else:
            k_all, v_all = k, v
        keep = min(T, w)
        slots = torch.arange(self.seen + T - keep, self.seen + T, device=k.device) % w
        ring_k.index_copy_(2, slots, k[:, :, T - keep :])
        ring_v.index_copy_(2, slots, v[:, :, T - keep :])
        return k_all, v_all, attention_mask(T, held + T, k.device, window=w)
