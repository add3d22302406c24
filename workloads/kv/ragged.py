"""Sequences of different lengths decoded as one batch, each in its own cache.

Continuous batching admits and retires requests at every step, so each request
keeps its own batch-1 cache, and one decode step runs them together: K and V
are padded to the longest sequence and the padding is masked out. The padded
copy is a per-step temporary, as it would be without a ragged attention kernel.
"""

from __future__ import annotations

import torch
from torch.nn.utils.rnn import pad_sequence

from workloads.kv.base import KVCache


class RaggedBatch:
    """A batch of batch-1 caches, for decode steps (one new token per sequence)."""

    def __init__(self, caches: list[KVCache]) -> None:
        if not caches or any(c.batch != 1 for c in caches):
            raise ValueError("a ragged batch needs one or more caches of batch 1")
        self.caches = caches
        self.batch = len(caches)
        self._mask: torch.Tensor | None = None

    def positions(self, n: int) -> torch.Tensor:
        if n != 1:
            raise ValueError("a ragged batch decodes one token per sequence; prefill each cache alone")
        return torch.cat([c.positions(1) for c in self.caches])[:, None]  # (B, 1)

    def update(self, layer, k, v):
        outs = [c.update(layer, k[i : i + 1], v[i : i + 1]) for i, c in enumerate(self.caches)]
        lens = [o[0].shape[2] for o in outs]
        if len(set(lens)) == 1:
            return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs]), None
        if layer == 0 or self._mask is None:
            ar = torch.arange(max(lens), device=k.device)
            self._mask = (ar[None, :] < torch.tensor(lens, device=k.device)[:, None])[:, None, None, :]
        # (L_i, H, D) per sequence, padded to (B, L_max, H, D), seen as (B, H, L_max, D).
        pad = lambda i: pad_sequence([o[i][0].transpose(0, 1) for o in outs], batch_first=True)  # noqa: E731
        return pad(0).transpose(1, 2), pad(1).transpose(1, 2), self._mask

    def advance(self, n: int) -> None:
        for c in self.caches:
            c.advance(n)
        self._mask = None

    def kv_stats(self) -> dict:
        rows = [c.kv_stats() for c in self.caches]
        total = {k: sum(r[k] for r in rows) for k in ("token_state_bytes", "reserved_bytes", "extra_bytes")}
        return dict(batch=self.batch, tokens=max(r["tokens"] for r in rows), **total)
