"""A compact nanoGPT-style GPT, the reference workload for vramscope.

Follows karpathy/nanoGPT closely so that memory numbers are comparable with it.
Module attribute names matter: they become the module paths that the profiler
attributes memory to (``blocks.0.attn.qkv``, ``blocks.3.mlp.fc``, ``lm_head`` ...).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

# The shapes are pure data, shared with the analytic memory model; the model code is here.
from profiler.presets import PRESETS, GPTConfig, preset

__all__ = ["GPT", "GPTConfig", "PRESETS", "Block", "CausalSelfAttention", "MLP", "preset"]


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.n_embd = cfg.n_embd
        # One matmul for q, k and v together, as in nanoGPT's c_attn.
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd)

    def heads(self, x: torch.Tensor):
        """q, k, v for x (B, T, C), each (B, nh, T, hs)."""
        B, T, C = x.size()
        q, k, v = self.qkv(x).split(self.n_embd, dim=2)  # each (B, T, C)
        hs = C // self.n_head
        return tuple(t.view(B, T, self.n_head, hs).transpose(1, 2) for t in (q, k, v))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = self.heads(x)  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C): heads side by side
        return self.proj(y)


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd)
        # A module rather than F.gelu so its activation shows up under its own path.
        self.act = nn.GELU(approximate="tanh")
        self.proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.act(self.fc(x)))  # (B, T, 4C) inside, (B, T, C) out


class Block(nn.Module):
    """Pre-LayerNorm transformer block."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        # Weight tying: the output projection is the token embedding.
        self.lm_head.weight = self.wte.weight

        # Uses the global RNG, so torch.manual_seed alone makes init reproducible.
        self.apply(self._init_weights)
        # GPT-2 scales the residual projections so the residual stream's
        # variance does not grow with depth (two residual adds per block).
        residual_std = 0.02 / math.sqrt(2 * cfg.n_layer)
        for block in self.blocks:
            nn.init.normal_(block.attn.proj.weight, mean=0.0, std=residual_std)
            nn.init.normal_(block.mlp.proj.weight, mean=0.0, std=residual_std)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        # LayerNorm keeps PyTorch's default (weight 1, bias 0).

    def num_params(self) -> int:
        """Number of parameters; the tied embedding/head weight counts once."""
        # parameters() already deduplicates shared tensors.
        return sum(p.numel() for p in self.parameters())

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, T = idx.size()
        if T > self.cfg.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.cfg.block_size}")
        pos = torch.arange(T, dtype=torch.long, device=idx.device)  # (T,)
        x = self.wte(idx) + self.wpe(pos)  # (B, T, C) + (T, C)
        for block in self.blocks:
            x = block(x)  # (B, T, C)
        x = self.ln_f(x)
        logits = self.lm_head(x)  # (B, T, V)

        loss = None
        if targets is not None:
            # Computed here rather than by the caller so that a memory profiler
            # attributes the (large, fp32) loss buffers to the model.
            V = logits.size(-1)
            loss = F.cross_entropy(logits.float().view(-1, V), targets.view(-1))
        return logits, loss
