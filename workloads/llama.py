"""A Llama-style model (RMSNorm, SwiGLU, RoPE, grouped-query attention) with random weights.

Built from a transformers LlamaConfig whose size follows a GPT preset, so the two
models are comparable; nothing is downloaded. transformers is imported lazily:
only this module needs it.
"""

from __future__ import annotations

import torch

from workloads.kv.base import KV_CATEGORY
from workloads.model import GPTConfig

ROPE_THETA = 10_000.0


def llama_config(cfg: GPTConfig):
    """A LlamaConfig as wide and deep as the GPT preset, with kv_heads = heads / 2 (GQA)
    where the head count allows, and the SwiGLU width Llama uses (8/3 d, rounded to 16)."""
    from transformers import LlamaConfig

    kv_heads = cfg.n_head // 2 if cfg.n_head % 2 == 0 else cfg.n_head
    return LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.n_embd,
        intermediate_size=-(-8 * cfg.n_embd // 3 // 16) * 16,
        num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head,
        num_key_value_heads=kv_heads,
        max_position_embeddings=cfg.block_size,
        rope_theta=ROPE_THETA,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
        use_cache=True,
    )


def build_llama(cfg: GPTConfig, device="cpu", dtype: torch.dtype = torch.float32):
    """LlamaForCausalLM with random weights, made directly on `device` in eval mode."""
    from transformers import LlamaForCausalLM

    with torch.device(device):
        model = LlamaForCausalLM(llama_config(cfg))
    return model.to(dtype).eval()


def dynamic_cache(model):
    """transformers' own DynamicCache, whose growth is allocated under the kv_cache category."""
    from transformers import DynamicCache

    from profiler import category

    class TaggedDynamicCache(DynamicCache):
        def update(self, *args, **kwargs):
            with category(KV_CATEGORY):
                return super().update(*args, **kwargs)

    return TaggedDynamicCache(config=model.config)


def forward_fn(model, cache):
    """ids -> logits (B, V) of the last position; with a cache, ids are only the new tokens."""

    def forward(ids: torch.Tensor) -> torch.Tensor:
        out = model(input_ids=ids, past_key_values=cache, use_cache=cache is not None, logits_to_keep=1)
        return out.logits[:, -1]

    return forward
