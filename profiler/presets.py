"""Model shapes: the reference GPT presets, and the shape the memory model reads from any config.

Pure data and arithmetic, no torch: the analytic model (profiler/estimate.py) and the CLI
read the presets without building a model; workloads/model.py builds the GPT from them.
transformers is imported lazily, only by `shape_from_hf` for a Hugging Face config name.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(kw_only=True, slots=True)
class GPTConfig:
    """Model shape plus the batch shape that one training step uses."""

    n_layer: int
    """Number of transformer blocks."""
    n_head: int
    """Attention heads per block; must divide ``n_embd``."""
    n_embd: int
    """Model width (d_model)."""
    vocab_size: int
    """Vocabulary size; 50304 is GPT-2's 50257 rounded up to a multiple of 64."""
    block_size: int
    """Maximum sequence length, i.e. rows of the position embedding."""
    batch_size: int
    """Sequences per training step."""
    seq_len: int
    """Tokens per sequence in a training step; at most ``block_size``."""

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if self.seq_len > self.block_size:
            raise ValueError(f"seq_len={self.seq_len} exceeds block_size={self.block_size}")


PRESETS: dict[str, GPTConfig] = {
    # Small enough for a fraction of a second per step on a 2-core CPU.
    "tiny": GPTConfig(n_layer=2, n_head=2, n_embd=64, vocab_size=256, block_size=64, batch_size=4, seq_len=32),
    # GPT-2 124M, as in nanoGPT's train_gpt2 config (batch 8 x 1024 tokens).
    "gpt2-small": GPTConfig(
        n_layer=12, n_head=12, n_embd=768, vocab_size=50304, block_size=1024, batch_size=8, seq_len=1024
    ),
}


def preset(name: str) -> GPTConfig:
    """Return a fresh copy of a named config, so callers may modify it freely."""
    try:
        return dataclasses.replace(PRESETS[name])
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; known presets: {sorted(PRESETS)}") from None


def unknown_preset(name: str) -> str:
    """The one-line message for a preset name that is not in PRESETS."""
    return f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}"


# -- the shape the memory model reads ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class ModelShape:
    """The shape the formulas need."""

    n_layer: int
    n_head: int
    n_embd: int
    vocab_size: int
    block_size: int = 1024
    n_kv_head: int | None = None
    ffn_hidden: int | None = None  # 4*h for GPT-2
    tied: bool = True
    bias: bool = True

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def ffn(self) -> int:
        return self.ffn_hidden or 4 * self.n_embd

    def block_matmul_params(self) -> int:
        """Weights of one block's four linear layers (what autocast casts to bf16)."""
        h, f = self.n_embd, self.ffn
        kvd = self.kv_heads * self.head_dim
        return h * (h + 2 * kvd) + h * h + 2 * h * f

    def block_params(self) -> int:
        h, f = self.n_embd, self.ffn
        kvd = self.kv_heads * self.head_dim
        biases = (h + 2 * kvd) + h + f + h if self.bias else 0
        return self.block_matmul_params() + biases + 2 * 2 * h  # two layer norms, weight and bias

    def block_param_tensors(self) -> int:
        return 12 if self.bias else 8

    def num_params(self) -> int:
        h = self.n_embd
        emb = self.vocab_size * h + self.block_size * h
        head = 0 if self.tied else self.vocab_size * h
        return emb + self.n_layer * self.block_params() + 2 * h + head

    def num_param_tensors(self) -> int:
        return 2 + self.n_layer * self.block_param_tensors() + 2 + (0 if self.tied else 1)


def shape_from_preset(name: str) -> ModelShape:
    if name not in PRESETS:
        raise ValueError(unknown_preset(name))
    c = PRESETS[name]
    return ModelShape(
        n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd, vocab_size=c.vocab_size, block_size=c.block_size
    )


def shape_from_hf(config) -> ModelShape:
    """From a transformers PretrainedConfig, a dict, or a name/path for AutoConfig."""
    if isinstance(config, str):
        from transformers import AutoConfig  # lazily: only for HF configs

        config = AutoConfig.from_pretrained(config)
    get = config.get if isinstance(config, dict) else (lambda k, d=None: getattr(config, k, d))

    def first(*keys, default=None):
        for k in keys:
            v = get(k)
            if v is not None:
                return v
        return default

    h = first("hidden_size", "n_embd", "d_model")
    return ModelShape(
        n_layer=first("num_hidden_layers", "n_layer", "num_layers"),
        n_head=first("num_attention_heads", "n_head"),
        n_embd=h,
        vocab_size=first("vocab_size"),
        block_size=first("max_position_embeddings", "n_positions", "n_ctx", default=2048),
        n_kv_head=first("num_key_value_heads"),
        ffn_hidden=first("intermediate_size", "n_inner", "ffn_dim"),
        tied=bool(first("tie_word_embeddings", default=True)),
    )


def to_shape(model_cfg) -> ModelShape:
    """A preset name, a GPTConfig-like object, an HF config (object, dict or name), or a
    model object (on the meta device is enough): a model is read through its config
    (`.config` for transformers models, `.cfg` for workloads.model.GPT)."""
    if isinstance(model_cfg, ModelShape):
        return model_cfg
    if hasattr(model_cfg, "parameters"):
        cfg = getattr(model_cfg, "config", None) or getattr(model_cfg, "cfg", None)
        if cfg is None:
            raise ValueError(f"{type(model_cfg).__name__} has no .config or .cfg to read its shape from")
        return to_shape(cfg)
    if isinstance(model_cfg, str):
        try:
            return shape_from_preset(model_cfg)
        except ValueError:
            return shape_from_hf(model_cfg)
    if all(hasattr(model_cfg, k) for k in ("n_layer", "n_head", "n_embd", "vocab_size", "block_size")):
        return ModelShape(
            n_layer=model_cfg.n_layer,
            n_head=model_cfg.n_head,
            n_embd=model_cfg.n_embd,
            vocab_size=model_cfg.vocab_size,
            block_size=model_cfg.block_size,
        )
    return shape_from_hf(model_cfg)
