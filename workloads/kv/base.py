"""What every KV cache shares: its shape spec, byte counting, attention masks.

A cache holds, per layer, K and V for a batch of B sequences that decode in
lockstep, in the layout (B, kv_heads, T, head_dim). The model calls
`update(layer, k, v)` once per layer with the new tokens' K and V, attends over
what it returns, and calls `advance(T)` once all layers have seen the new tokens.

Caches report their memory through the KV protocol of profiler/capture/kv.py:
`kv_stats()` -> batch, tokens, token_state_bytes, reserved_bytes, extra_bytes.
The bytes are counted from the cache's own tensors rather than from a formula,
so that tests can hold them against the formula.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from profiler import category
from profiler.trace.schema import Category

# What cache storage is allocated under: profiler.category(KV_CATEGORY).
KV_CATEGORY = Category.KV_CACHE.value


@dataclass(kw_only=True, slots=True)
class KVSpec:
    """The shape of one model's K and V states."""

    layers: int
    """Transformer layers, each with its own K and V."""
    kv_heads: int
    """K/V heads per layer (fewer than query heads under grouped-query attention)."""
    head_dim: int
    """Channels per head."""
    dtype: torch.dtype = torch.float32
    """dtype of K and V as the model computes them."""
    device: str | torch.device = "cpu"

    def __post_init__(self) -> None:
        if min(self.layers, self.kv_heads, self.head_dim) < 1:
            raise ValueError(f"layers, kv_heads and head_dim must be positive: {self}")

    @property
    def token_bytes(self) -> int:
        """K and V bytes of one token of one sequence, over all layers."""
        return self.layers * 2 * self.kv_heads * self.head_dim * self.dtype.itemsize


def tensor_bytes(tensors) -> int:
    """Bytes held by tensors (None entries skipped); each must own its whole storage."""
    return sum(t.nbytes for t in tensors if t is not None)


def filled_bytes(tensors, tokens: int) -> int:
    """Bytes of the first `tokens` positions (dim -2) of (B, H, T, D) tensors."""
    return sum(t.nbytes // t.shape[-2] * tokens for t in tensors if t is not None)


def attention_mask(q_len: int, kv_len: int, device, window: int | None = None) -> torch.Tensor | None:
    """Bool mask (q_len, kv_len), True where a query may attend; the queries are the
    last q_len of the kv_len positions. None where SDPA needs no mask: one query over
    its whole past, or is_causal=True over a square (both within the window)."""
    if window is None or kv_len <= window:
        if q_len == 1 or q_len == kv_len:
            return None
    q_pos = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
    k_pos = torch.arange(kv_len, device=device)[None, :]
    mask = k_pos <= q_pos
    if window is not None:
        mask &= k_pos > q_pos - window
    return mask


class KVCache:
    """Base class: position bookkeeping and the protocol; subclasses own the storage.

    A subclass names its `kind` (its name in workloads.kv.CACHES, the infer workload's kv
    toggle and the ablation's kv suite) and, if it needs one of make_cache's options,
    overrides `create`.
    """

    kind = "base"

    def __init__(self, spec: KVSpec, batch: int) -> None:
        if batch < 1:
            raise ValueError(f"batch must be positive, got {batch}")
        self.spec = spec
        self.batch = batch
        self.seen = 0  # tokens processed per sequence (positions 0 .. seen-1)

    @classmethod
    def create(
        cls,
        spec: KVSpec,
        batch: int,
        *,
        max_len: int | None = None,
        window: int | None = None,
        block_size: int | None = None,
        pool=None,
    ) -> KVCache:
        """A cache from workloads.kv.make_cache's options; this kind needs none of them."""
        return cls(spec, batch)

    @property
    def tokens(self) -> int:
        """Token positions whose states the cache holds now, per sequence."""
        return self.seen

    def positions(self, n: int) -> torch.Tensor:
        """Absolute positions (n,) of the next n tokens, for position embeddings."""
        return torch.arange(self.seen, self.seen + n, device=self.spec.device)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store the new tokens' K and V (B, kv_heads, T, head_dim) of one layer and
        return (k_all, v_all, mask) to attend over (mask: see `attention_mask`)."""
        raise NotImplementedError

    def advance(self, n: int) -> None:
        """Every layer has stored the n new tokens."""
        self.seen += n

    def release(self) -> None:
        """Drop the storage (the cache is unusable after)."""
        raise NotImplementedError

    # -- the KV protocol -----------------------------------------------------------
    def kv_stats(self) -> dict:
        return dict(
            batch=self.batch,
            tokens=self.tokens,
            token_state_bytes=self.token_state_bytes(),
            reserved_bytes=self.reserved_bytes(),
            extra_bytes=self.extra_bytes(),
        )

    def token_state_bytes(self) -> int:
        raise NotImplementedError

    def reserved_bytes(self) -> int:
        raise NotImplementedError

    def extra_bytes(self) -> int:
        return 0

    def _check_new(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> int:
        s = self.spec
        want = (self.batch, s.kv_heads, k.shape[2], s.head_dim)
        if tuple(k.shape) != want or tuple(v.shape) != want or not 0 <= layer < s.layers:
            raise ValueError(
                f"layer {layer}: K {tuple(k.shape)} / V {tuple(v.shape)}, expected {want} and layer < {s.layers}"
            )
        return k.shape[2]


class FixedKV(KVCache):
    """Storage of `length` positions per layer, allocated once at construction and
    filled in place (the preallocated and the sliding-window caches)."""

    def __init__(self, spec: KVSpec, batch: int, length: int) -> None:
        super().__init__(spec, batch)
        if length < 1:
            raise ValueError(f"the cache length must be positive, got {length}")
        shape = (batch, spec.kv_heads, length, spec.head_dim)
        with category(KV_CATEGORY):
            self.k = [torch.empty(shape, dtype=spec.dtype, device=spec.device) for _ in range(spec.layers)]
            self.v = [torch.empty(shape, dtype=spec.dtype, device=spec.device) for _ in range(spec.layers)]
        # The storage never changes, so neither do these: kv_stats runs after every decode
        # step, where two dozen tensor calls a step were tens of microseconds of a token.
        self._position_bytes = filled_bytes(self.k + self.v, 1)  # one position of every layer
        self._reserved = tensor_bytes(self.k + self.v)

    def release(self) -> None:
        self.k, self.v = [], []
        self._position_bytes = self._reserved = 0

    def token_state_bytes(self) -> int:
        return self._position_bytes * self.tokens

    def reserved_bytes(self) -> int:
        return self._reserved
