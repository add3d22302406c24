"""The preallocated cache: K and V allocated once for `max_len` tokens, filled in place.

The layout of transformers' StaticCache. No allocation while decoding; what is
reserved but not yet filled is (max_len - tokens) positions per sequence.
"""

from __future__ import annotations

from workloads.kv.base import FixedKV, KVSpec, attention_mask


class PreallocCache(FixedKV):
    kind = "prealloc"

    def __init__(self, spec: KVSpec, batch: int, max_len: int) -> None:
        super().__init__(spec, batch, max_len)
        self.max_len = max_len

    @classmethod
    def create(cls, spec, batch, *, max_len=None, **_) -> PreallocCache:
        if max_len is None:
            raise ValueError("a prealloc cache needs max_len")
        return cls(spec, batch, max_len)

    def update(self, layer, k, v):
        T = self._check_new(layer, k, v)
        end = self.seen + T
        if end > self.max_len:
            raise ValueError(f"{end} tokens do not fit a cache of max_len={self.max_len}")
        self.k[layer][:, :, self.seen : end].copy_(k)
        self.v[layer][:, :, self.seen : end].copy_(v)
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end], attention_mask(T, end, k.device)

    def reset(self) -> None:
        """Start a new batch of sequences in the same storage (a serving slot reused)."""
        self.seen = 0
