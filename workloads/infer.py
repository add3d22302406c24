"""Greedy decode under capture: one profiler step per generated token.

    python -m workloads.infer --preset tiny --kv paged --steps 16 --device cpu

`run()` is the ablation runner's entry point (workloads/interface.md). The GPT of
workloads/model.py gets a decode path here: `with_kv_path(model)` turns a GPT into
a KVGPT in place (same parameters, same module paths), whose forward takes a KV
cache from workloads.kv and returns the last position's logits.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

import profiler
from profiler.errors import one_line
from profiler.trace.meta import read_meta_lenient
from workloads.kv import KINDS, KVSpec, make_cache
from workloads.model import GPT, Block, CausalSelfAttention
from workloads.model import preset as gpt_preset
from workloads.quant import quantize_linears

KV_CHOICES = ("none",) + KINDS
MODELS = ("gpt", "llama")
WEIGHTS = ("bf16", "int8")
LLAMA_KV = ("none", "concat")  # transformers' DynamicCache; the other layouts are ours, GPT only
RUNNER_KEYS = ("alloc_conf",)  # toggles the runner applies itself


# -- the GPT's decode path ------------------------------------------------------------


class KVAttention(CausalSelfAttention):
    """CausalSelfAttention that stores K and V in a cache and attends over what it returns."""

    def forward(self, x: torch.Tensor, cache=None, layer: int = 0) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = self.heads(x)  # (B, nh, T, hs)
        mask = None
        if cache is not None:
            k, v, mask = cache.update(layer, k, v)  # (B, nh, T_kv, hs)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.proj(y)


class KVBlock(Block):
    def forward(self, x: torch.Tensor, cache=None, layer: int = 0) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache, layer)
        x = x + self.mlp(self.ln_2(x))
        return x


class KVGPT(GPT):
    """A GPT whose forward decodes: `model(idx, cache)` -> logits (B, 1, V) of the last position.

    With a cache, idx holds only the new tokens and their positions continue the
    cache's; without one, idx is the whole sequence (recomputed every token)."""

    def forward(self, idx: torch.Tensor, cache=None) -> torch.Tensor:  # type: ignore[override]
        T = idx.size(1)
        pos = cache.positions(T) if cache is not None else torch.arange(T, device=idx.device)
        x = self.wte(idx) + self.wpe(pos)  # (B, T, C)
        for layer, block in enumerate(self.blocks):
            x = block(x, cache, layer)
        if cache is not None:
            cache.advance(T)
        return self.lm_head(self.ln_f(x[:, -1:]))  # (B, 1, V): greedy decode needs no more


def with_kv_path(model: GPT) -> KVGPT:
    """Give a GPT the decode path, in place: the subclasses add methods, not state."""
    if type(model) not in (GPT, KVGPT):
        raise TypeError(f"expected a workloads.model.GPT, got {type(model).__name__}")
    model.__class__ = KVGPT
    for block in model.blocks:
        block.__class__ = KVBlock
        block.attn.__class__ = KVAttention
    return model


def kv_spec(model: GPT, device, dtype: torch.dtype) -> KVSpec:
    c = model.cfg
    return KVSpec(layers=c.n_layer, kv_heads=c.n_head, head_dim=c.n_embd // c.n_head, dtype=dtype, device=device)


def sdpa_backends(device):
    """Pin SDPA's backend: on CUDA flash or memory-efficient, since torch 2.11 otherwise
    picks cuDNN for q_len=1 and rebuilds a plan per KV length (shared/GPU_NOTES.md)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if torch.device(device).type == "cuda":
        return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION])
    return sdpa_kernel([SDPBackend.MATH])


def greedy_decode(
    forward, prompt: torch.Tensor, steps: int, *, recompute: bool, after_step=None, times: list | None = None, sync=None
) -> torch.Tensor:
    """Prefill `prompt` (B, P), then `steps` decode steps, each feeding the last token.

    `forward(ids)` returns the last position's logits (B, V). Returns the steps + 1
    greedy tokens (B, steps + 1): the prefill's, then one per decode step. `recompute`
    feeds the whole sequence every step (no cache). `after_step()` runs after the
    prefill and after each decode step; `times` collects each decode step's seconds."""
    nxt = forward(prompt).argmax(-1, keepdim=True)  # (B, 1)
    out, seq = [nxt], prompt
    if after_step:
        after_step()
    for _ in range(steps):
        t0 = time.perf_counter()
        if recompute:
            seq = torch.cat([seq, nxt], dim=1)
        nxt = forward(seq if recompute else nxt).argmax(-1, keepdim=True)
        if sync:
            sync()
        if times is not None:
            times.append(time.perf_counter() - t0)
        out.append(nxt)
        if after_step:
            after_step()
    return torch.cat(out, dim=1)


def gpt_forward(model: KVGPT, cache):
    return lambda ids: model(ids, cache)[:, -1]


# -- configuration --------------------------------------------------------------------


@dataclass(kw_only=True, slots=True)
class InferConfig:
    preset: str
    """GPT preset (workloads/model.py); model=llama builds a Llama of the same size."""
    device: str = "cpu"
    """cpu, cuda (or cuda:N), or auto (cuda when available)."""
    steps: int = 8
    """Decode steps after the prefill; each is one profiler step and one new token."""
    kv: str | None = None
    """KV cache: none (None: recompute the prefix every token) or a workloads.kv kind (KINDS)."""
    weights: str | None = None
    """bf16 (None; fp32 on CPU) or int8 (weight-only, per output channel)."""
    model: str | None = None
    """gpt (None) or llama (transformers' LlamaForCausalLM, random weights)."""
    batch: int | None = None
    """Sequences decoded together (None: the preset's batch_size)."""
    prompt_len: int | None = None
    """Prompt tokens (None: min(128, block_size // 4))."""
    window: int | None = None
    """Sliding window in tokens (None: block_size // 8)."""
    block_size: int | None = None
    """Tokens per paged block (None: 16)."""
    max_len: int | None = None
    """Positions a prealloc cache reserves (None: prompt_len + steps)."""
    seed: int = 0

    def __post_init__(self) -> None:
        gpt = gpt_preset(self.preset)
        if self.device == "auto":
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.kv = self.kv or "none"
        self.weights = self.weights or "bf16"
        self.model = self.model or "gpt"
        for key, value, allowed in (
            ("kv", self.kv, KV_CHOICES),
            ("weights", self.weights, WEIGHTS),
            ("model", self.model, MODELS),
        ):
            if value not in allowed:
                raise ValueError(f"{key}={value!r}: expected one of {', '.join(allowed)}")
        if self.model == "llama" and self.kv not in LLAMA_KV:
            raise ValueError(f"model=llama supports kv in {LLAMA_KV} (transformers' DynamicCache), not {self.kv!r}")
        self.batch = self.batch or gpt.batch_size
        self.prompt_len = self.prompt_len or min(128, gpt.block_size // 4)
        self.window = self.window or max(1, gpt.block_size // 8)
        self.block_size = self.block_size or 16
        self.max_len = self.max_len or self.prompt_len + self.steps
        if min(self.steps, self.batch, self.prompt_len, self.window, self.block_size) < 1:
            raise ValueError(f"steps, batch, prompt_len, window and block_size must be positive: {self}")
        if self.prompt_len + self.steps > gpt.block_size:
            raise ValueError(
                f"prompt_len + steps = {self.prompt_len + self.steps} exceeds the "
                f"{gpt.block_size} positions of preset {self.preset!r}"
            )
        if self.max_len < self.prompt_len + self.steps:
            raise ValueError(f"max_len={self.max_len} < prompt_len + steps = {self.prompt_len + self.steps}")

    @classmethod
    def from_toggles(cls, preset: str, toggles: dict, *, steps: int, device: str) -> InferConfig:
        known = {f.name for f in fields(cls)} - {"preset", "device", "steps"}
        unknown = set(toggles) - known - set(RUNNER_KEYS)
        if unknown:
            raise ValueError(f"unknown infer toggles {sorted(unknown)}; known: {sorted(known)}")
        return cls(preset=preset, steps=steps, device=device, **{k: v for k, v in toggles.items() if k in known})

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if torch.device(self.device).type == "cuda" else torch.float32


# -- building and running --------------------------------------------------------------


def build_model(cfg: InferConfig):
    """The model in eval mode on cfg.device, seeded, with int8 weights if asked."""
    torch.manual_seed(cfg.seed)
    gpt = gpt_preset(cfg.preset)
    if cfg.model == "llama":
        from workloads.llama import build_llama

        model = build_llama(gpt, cfg.device, cfg.dtype)
    else:
        with torch.device(cfg.device):
            model = with_kv_path(GPT(gpt)).to(cfg.dtype).eval()
    if cfg.weights == "int8":
        quantize_linears(model)
    return model


def make_prompt(cfg: InferConfig) -> torch.Tensor:
    g = torch.Generator(cfg.device).manual_seed(cfg.seed)
    vocab = gpt_preset(cfg.preset).vocab_size
    return torch.randint(vocab, (cfg.batch, cfg.prompt_len), generator=g, device=cfg.device)


def make_decoder(cfg: InferConfig, model):
    """(cache or None, forward) for cfg.kv; call inside the capture, so the cache's
    storage is allocated there."""
    if cfg.model == "llama":
        from workloads.llama import dynamic_cache, forward_fn

        cache = dynamic_cache(model) if cfg.kv == "concat" else None
        return cache, forward_fn(model, cache)
    if cfg.kv == "none":
        return None, gpt_forward(model, None)
    cache = make_cache(
        cfg.kv,
        kv_spec(model, cfg.device, cfg.dtype),
        cfg.batch,
        max_len=cfg.max_len,
        window=cfg.window,
        block_size=cfg.block_size,
    )
    return cache, gpt_forward(model, cache)


def run(preset: str, toggles: dict, *, out: str, name: str, steps: int, device: str) -> dict:
    """Capture `steps` decode steps of one configuration; returns the interface's result dict."""
    cfg = InferConfig.from_toggles(preset, toggles, steps=steps, device=device)
    model = build_model(cfg)
    prompt = make_prompt(cfg)
    cuda = torch.device(cfg.device).type == "cuda"
    times: list[float] = []
    prof = profiler.profile(
        out=out, name=name, config={"preset": preset, **toggles}, backend=torch.device(cfg.device).type
    )
    status, error = "ok", None
    try:
        with prof, torch.no_grad(), sdpa_backends(cfg.device):
            cache, forward = make_decoder(cfg, model)

            def after_step():
                if cache is not None:
                    profiler.record_kv(cache)
                prof.step()

            greedy_decode(
                forward,
                prompt,
                steps,
                recompute=cache is None,
                after_step=after_step,
                times=times,
                sync=torch.cuda.synchronize if cuda else None,
            )
    except torch.OutOfMemoryError as e:
        status, error = "oom", one_line(e)
    except Exception as e:  # the runner records it; the traceback goes to stderr
        traceback.print_exc()
        status, error = "error", one_line(e)
    return _result(prof.run_dir, status, error, times, cfg.batch)


def _result(run_dir, status, error, times, batch) -> dict:
    meta = (read_meta_lenient(run_dir) or {}) if run_dir is not None else {}
    median_s = statistics.median(times) if times else None
    return dict(
        status=status,
        run_dir=str(run_dir) if run_dir else None,
        peak_allocated_bytes=meta.get("max_allocated_bytes"),
        peak_reserved_bytes=meta.get("max_reserved_bytes"),
        median_step_ms=median_s * 1e3 if median_s else None,
        tokens_per_s=batch / median_s if median_s else None,
        loss=None,
        losses=[],
        error=error,
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="traces")
    p.add_argument("--name", default=None)
    for f in fields(InferConfig):
        if f.name not in ("preset", "device", "steps", "seed"):
            p.add_argument(
                "--" + f.name.replace("_", "-"),
                dest=f.name,
                default=None,
                type=int if f.type in ("int | None",) else str,
            )
    args = vars(p.parse_args(argv))
    base = ("preset", "steps", "device", "out", "name")
    toggles = {k: v for k, v in args.items() if k not in base and v is not None}
    name = args["name"] or "infer-" + "-".join(f"{k}={v}" for k, v in toggles.items())
    result = run(args["preset"], toggles, out=args["out"], name=name, steps=args["steps"], device=args["device"])
    json.dump(result, sys.stdout, indent=2)
    print()
    sys.exit(0 if result["status"] == "ok" else 1)


if __name__ == "__main__":
    main()
