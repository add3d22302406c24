"""The int8 cache: K and V stored as int8 with one scale per (sequence, head, token).

Symmetric absmax quantization over head_dim; the scales are kept in the model's
dtype. Storage grows by concatenation like ConcatCache, so the two differ only
in bytes per token. Attention runs on a dequantized copy of the layer's K and V,
a temporary of the model's dtype that exists only during that layer's attention.
"""

from __future__ import annotations

import torch

from profiler import category
from workloads.kv.base import KV_CATEGORY, KVCache, KVSpec, attention_mask, tensor_bytes

QMAX = 127


def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, H, T, D) -> int8 values (B, H, T, D) and scales (B, H, T) in x's dtype."""
    scale = x.abs().amax(dim=-1, keepdim=True).float() / QMAX
    scale = scale.clamp(min=torch.finfo(torch.float32).tiny)
    q = (x.float() / scale).round_().clamp_(-QMAX, QMAX).to(torch.int8)
    return q, scale.squeeze(-1).to(x.dtype)


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q * scale.unsqueeze(-1)  # int8 * float promotes to the scale's dtype


class Int8Cache(KVCache):
    kind = "int8"

    def __init__(self, spec: KVSpec, batch: int) -> None:
        super().__init__(spec, batch)
        n = spec.layers
        self.qk: list[torch.Tensor | None] = [None] * n  # int8 (B, kv_heads, T, hd)
        self.qv: list[torch.Tensor | None] = [None] * n
        self.sk: list[torch.Tensor | None] = [None] * n  # scales (B, kv_heads, T)
        self.sv: list[torch.Tensor | None] = [None] * n

    def update(self, layer, k, v):
        T = self._check_new(layer, k, v)
        new = quantize(k) + quantize(v)  # temporaries; the cache's storage is made below
        stores = (self.qk, self.sk, self.qv, self.sv)
        with category(KV_CATEGORY):
            for store, x in zip(stores, new):
                old = store[layer]
                store[layer] = x.clone() if old is None else torch.cat([old, x], dim=2)
        kv_len = self.qk[layer].shape[2]
        k_all = dequantize(self.qk[layer], self.sk[layer])
        v_all = dequantize(self.qv[layer], self.sv[layer])
        return k_all, v_all, attention_mask(T, kv_len, k.device)

    def release(self) -> None:
        n = self.spec.layers
        self.qk, self.qv, self.sk, self.sv = [None] * n, [None] * n, [None] * n, [None] * n

    def token_state_bytes(self) -> int:
        return tensor_bytes(self.qk + self.qv)

    def reserved_bytes(self) -> int:
        return tensor_bytes(self.qk + self.qv)

    def extra_bytes(self) -> int:
        return tensor_bytes(self.sk + self.sv)
