"""Analytic memory model of a GPT training step (and a KV cache), and measured vs predicted.

Pure arithmetic: no torch is needed. transformers is imported lazily, only by
`shape_from_hf` for a Hugging Face config.

Notation: b batch (micro-batch under accumulation), s sequence, h width, a heads,
L layers, V vocabulary, P parameters (tied embedding counted once), sbh = s*b*h.

Activations per block (Korthikanti et al. 2022, "Reducing Activation Recomputation
in Large Transformer Models", eq. 1): s*b*h*(34 + 5*a*s/h) bytes, everything 2 bytes
and dropout masks 1 byte per element:
    attention 11*sbh + 5*a*s^2*b: QKV input 2, Q and K 4, V 2, output-projection
        input 2, output dropout mask 1 (= 11 sbh); scores 2*a*s^2*b, softmax dropout
        mask a*s^2*b, dropout output 2*a*s^2*b (= 5 a s^2 b);
    MLP 19*sbh: fc input 2, GELU input 8, GELU output (proj input) 8, dropout mask 1;
    layer norms 4*sbh: the two inputs.
Adjusted for our workloads (nanoGPT, workloads/model.py):
  * no dropout: the two 1-byte sbh masks go (34 -> 32), and so does the a*s^2*b mask;
  * flash / memory-efficient SDPA: no s^2 score or softmax storage, so the whole
    5*a*s/h term goes. SDPA saves its output (already counted as the projection input:
    the .transpose().contiguous() after SDPA is a no-op, the kernel's output is laid
    out (B,T,nh,hs)) and a logsumexp of b*a*s fp32;
  * the layer norms also keep mean and rstd: 2 x b*s fp32 each;
  * fp32: every 2-byte term doubles: 64*sbh;
  * bf16/fp16 autocast: the residual stream stays fp32 (x + bf16 -> fp32) and the layer
    norms run in fp32, so the two layer-norm inputs are 4-byte (4 -> 8 sbh); the layer-norm
    fp32 outputs are not kept (the linear saves its bf16 cast instead, 2 sbh, already
    counted): 32 + 4 = 36*sbh; plus autocast's bf16 copies of the block's matmul weights
    (2 bytes per block weight), which backward keeps.
Checkpointing (non-reentrant torch.utils.checkpoint on whole Blocks):
  * full / every:k: a checkpointed block keeps only its input, the fp32 residual
    (4*sbh; 2*sbh in the paper's all-2-byte setting); during its recompute in backward
    one block's full activations exist again (one block at a time);
  * selective (workloads/toggles/checkpointing.py): the outputs of the four matmuls are
    kept (qkv 3h, attention proj h, fc 4h, mlp proj h = 9 sbh elements in the compute
    dtype) plus the block input; SDPA, GELU, layer norms and casts are recomputed.
Outside the blocks: the embedding sum (fp32 b*s*h), the final layer norm's input (the
last block's output, counted with the blocks) and output (fp32, or its bf16 cast plus
the bf16 copy of the tied V*h weight), and the logits:
  * end of forward: the logits b*s*V in the compute dtype, the fp32 copy logits.float()
    (the same tensor in fp32: .float() is then a no-op) and cross_entropy's saved
    log-softmax b*s*V*4. The loop drops the logits after the loss, so only the
    log-softmax stays saved;
  * loss backward (the peak on every bundled run): the saved log-softmax, the gradient
    wrt it and the gradient wrt the fp32 logits: 3 x b*s*V*4. The first is reported as
    "activation", the two gradients as "temporary", as the trace classifies them.
Parameters, gradients, optimizer state: fp32 master weights (4 B/param, autocast keeps
them fp32), fp32 gradients; AdamW keeps exp_avg and exp_avg_sq (2 x 4 B/param) and a
step scalar per parameter tensor (on the CPU for the foreach AdamW; on the device,
4 B each, for the fused one); SGD with momentum one buffer (4 B/param), plain SGD none.
KV cache: layers x 2 x tokens x kv_heads x head_dim x dtype bytes x batch.
Workspace: cuBLAS allocates a workspace per handle on first use (two are seen on the
H100 runs: 33 MiB in forward, 32 MiB in backward); device-dependent, a parameter.

The predicted peak is the max over phases (see `phases`):
  forward_end    P + G_acc + O + A + logits at the end of forward;
  loss_backward  P + G_acc + O + A(with only log-softmax kept) + 2 x b*s*V*4 + workspace;
  recompute      with checkpointing: P + G + O + A_kept + one block's full activations
                 (an upper bound: by then the logits gradients are gone, grads are partial);
  optimizer_step P + G + O (+ a foreach temporary of up to one 4 B/param list for AdamW).
G_acc, the gradients already held during forward, is 0 with accumulation 1: the loop
calls zero_grad(set_to_none=True), so gradients are freed before each forward. With
accumulation k > 1 the later micro-batches run with all gradients held. On the first
step the optimizer state is not allocated yet (created lazily by the first step()),
so the first step's peak is lower; the model predicts the steady state.
"""

from __future__ import annotations

from dataclasses import dataclass

MiB = 1 << 20
PRECISION_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
OPTIMIZERS = ("sgd", "sgd_momentum", "adamw", "adamw_fused")
DEFAULT_WORKSPACE = 65 * MiB
# Run-config keys the model understands; anything else (offload, ...) is refused.
UNDERSTOOD_KEYS = {"preset", "precision", "checkpointing", "accumulation", "optimizer", "attention",
                   "compile", "alloc_conf", "steps", "device", "seed", "batch_size", "seq_len",
                   "tokens_per_step"}  # tokens_per_step is derived (batch x seq), not a toggle


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
    from workloads.model import PRESETS  # a dataclass module; importing it pulls torch only there

    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
    c = PRESETS[name]
    return ModelShape(n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd, vocab_size=c.vocab_size,
                      block_size=c.block_size)


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


def _checkpointed(n_layer: int, checkpointing) -> list[bool]:
    if checkpointing in (None, False, "off", "none", ""):
        return [False] * n_layer
    text = str(checkpointing)
    if text in ("full", "selective"):
        return [True] * n_layer
    mode, _, k = text.partition(":")
    if mode == "every" and k.isdigit() and int(k) >= 1:
        return [i % int(k) == 0 for i in range(n_layer)]
    raise ValueError(f"checkpointing {checkpointing!r} is not one of full, every:k, selective")


def block_activation_bytes(shape: ModelShape, *, batch: int, seq: int, precision: str = "fp32",
                           flash: bool = True, dropout: bool = False) -> int:
    """Bytes one un-checkpointed block keeps for backward (see the module docstring)."""
    b, s, h, a = batch, seq, shape.n_embd, shape.n_head
    sbh = s * b * h
    wide = shape.ffn / (4 * h)  # GELU in/out scale with the FFN width: 16 of the 32 are 8+8
    kv = shape.kv_heads / shape.n_head  # K and V: 4 of the 32 (2 each)
    if precision == "fp32":
        coeff = 2 * (32 - 16 - 4 + 16 * wide + 4 * kv)  # all 2-byte terms doubled: 64
        weights = 0
    else:
        coeff = 36 - 16 - 4 + 16 * wide + 4 * kv  # the two layer-norm inputs fp32: 32 + 4
        weights = 2 * shape.block_matmul_params()  # autocast's bf16 weight copies
    total = int(coeff * sbh) + weights
    total += 2 * 2 * b * s * 4  # two layer norms' mean and rstd, fp32
    if dropout:
        total += 2 * sbh  # two 1-byte masks
    if flash:
        total += b * a * s * 4  # SDPA logsumexp, fp32
    else:  # math attention: softmax output (2 B) kept; with dropout also mask (1 B) and its output (2 B)
        unit = 2 if precision == "fp32" else 1
        total += 2 * unit * a * s * s * b + ((1 + 2 * unit) * a * s * s * b if dropout else 0)
    return total


def checkpointed_block_bytes(shape: ModelShape, *, batch: int, seq: int, precision: str,
                             selective: bool) -> int:
    """Bytes a checkpointed block keeps: its input (fp32 residual), or under selective
    checkpointing also its matmul outputs (9*sbh elements in the compute dtype)."""
    sbh = seq * batch * shape.n_embd
    if not selective:
        return 4 * sbh
    e = PRECISION_BYTES[precision]
    kvd = shape.kv_heads * shape.head_dim
    mm_out = seq * batch * ((shape.n_embd + 2 * kvd) + shape.n_embd + shape.ffn + shape.n_embd)
    return 4 * sbh + e * mm_out


def optimizer_state_bytes(shape: ModelShape, optimizer: str) -> int:
    P = shape.num_params()
    if optimizer == "sgd":
        return 0
    if optimizer == "sgd_momentum":
        return 4 * P
    if optimizer == "adamw":
        return 8 * P  # step tensors stay on the CPU for the foreach implementation
    if optimizer == "adamw_fused":
        return 8 * P + 4 * shape.num_param_tensors()  # one fp32 step per parameter on the device
    raise ValueError(f"optimizer {optimizer!r} is not one of {', '.join(OPTIMIZERS)}")


def kv_cache_bytes(shape: ModelShape, *, tokens: int, batch: int, dtype_bytes: int = 2) -> int:
    """layers x 2 (K and V) x tokens x kv_heads x head_dim x dtype bytes x batch."""
    return shape.n_layer * 2 * tokens * shape.kv_heads * shape.head_dim * dtype_bytes * batch


def estimate(model_cfg, *, batch: int, seq: int, precision: str = "fp32", optimizer: str = "adamw",
             checkpointing=None, accumulation: int = 1, kv_tokens: int = 0, kv_dtype_bytes: int = 2,
             flash: bool = True, dropout: bool = False, workspace_bytes: int = DEFAULT_WORKSPACE,
             detail: bool = False) -> dict:
    """Predicted bytes per category at the predicted peak, and "peak".

    model_cfg: a ModelShape, a preset name, a workloads GPTConfig, a transformers config or a dict
    of HF keys. batch is the sequences per optimizer step; each micro-batch is batch/accumulation.
    Keys: parameter, gradient, optimizer_state, activation, temporary, workspace, kv_cache, peak
    (and, with detail=True, "phases", "per_block" and "logits_forward"). See the module docstring.
    """
    shape = to_shape(model_cfg)
    if precision not in PRECISION_BYTES:
        raise ValueError(f"precision {precision!r} is not one of fp32, bf16, fp16")
    accumulation = int(accumulation or 1)
    if batch % accumulation:
        raise ValueError(f"batch {batch} is not divisible by accumulation {accumulation}")
    b, s, h, V, L = batch // accumulation, seq, shape.n_embd, shape.vocab_size, shape.n_layer
    e = PRECISION_BYTES[precision]
    sbh = s * b * h
    bsV = b * s * V
    P = shape.num_params()
    params = 4 * P
    grads_full = 4 * P
    opt = optimizer_state_bytes(shape, optimizer)

    ckpt = _checkpointed(L, checkpointing)
    selective = str(checkpointing) == "selective"
    full_block = block_activation_bytes(shape, batch=b, seq=s, precision=precision, flash=flash,
                                        dropout=dropout)
    kept_block = checkpointed_block_bytes(shape, batch=b, seq=s, precision=precision, selective=selective)
    per_block = [kept_block if c else full_block for c in ckpt]
    embed = 4 * sbh  # wte(idx) + wpe(pos), fp32 (block 0's input)
    if precision == "fp32":
        ln_f = 4 * sbh + 2 * b * s * 4  # output (lm_head input) + mean/rstd
    else:
        ln_f = 2 * sbh + 2 * b * s * 4 + 2 * V * h  # bf16 cast + stats + bf16 copy of the tied weight
    saved_logsoftmax = 4 * bsV
    blocks_total = sum(per_block)
    activation = embed + blocks_total + ln_f + saved_logsoftmax
    logits_forward = (e * bsV + 4 * bsV if precision != "fp32" else 4 * bsV) + saved_logsoftmax
    loss_grads = 2 * 4 * bsV
    g_acc = grads_full if accumulation > 1 else 0
    kv = kv_cache_bytes(shape, tokens=kv_tokens, batch=batch, dtype_bytes=kv_dtype_bytes) if kv_tokens else 0

    base = params + g_acc + opt + kv
    phases = {
        "forward_end": base + embed + blocks_total + ln_f + logits_forward + workspace_bytes // 2,
        "loss_backward": base + activation + loss_grads + workspace_bytes,
        "optimizer_step": params + grads_full + opt + kv + (4 * P if optimizer.startswith("adamw") else 0),
    }
    if any(ckpt):
        phases["recompute"] = params + grads_full + opt + kv + embed + blocks_total + full_block + workspace_bytes
    peak_phase = max(phases, key=phases.get)
    out = {
        "parameter": params,
        "gradient": g_acc if peak_phase in ("forward_end", "loss_backward") else grads_full,
        "optimizer_state": opt,
        "activation": activation if peak_phase == "loss_backward" else
                      (activation - saved_logsoftmax + logits_forward if peak_phase == "forward_end" else
                       (embed + blocks_total + full_block if peak_phase == "recompute" else 0)),
        "temporary": loss_grads if peak_phase == "loss_backward" else 0,
        "workspace": workspace_bytes,
        "kv_cache": kv,
        "peak": phases[peak_phase],
        "peak_phase": peak_phase,
    }
    if detail:
        out["phases"] = phases
        out["per_block"] = per_block
        out["logits_forward"] = logits_forward
        out["num_params"] = P
    return out


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
        return ModelShape(n_layer=model_cfg.n_layer, n_head=model_cfg.n_head, n_embd=model_cfg.n_embd,
                          vocab_size=model_cfg.vocab_size, block_size=model_cfg.block_size)
    return shape_from_hf(model_cfg)


# -- a run's config ----------------------------------------------------------------------

def config_from_meta(meta: dict) -> dict:
    """estimate() keyword arguments for a run's meta.json, or ValueError naming what is not understood."""
    cfg = dict(meta.get("config") or {})
    unknown = sorted(k for k, v in cfg.items() if k not in UNDERSTOOD_KEYS
                     and v not in (None, False, "off", "none"))
    if unknown:
        raise ValueError(f"the memory model does not understand toggle(s) {', '.join(unknown)}")
    preset = cfg.get("preset")
    if not preset:
        raise ValueError("the run's config names no preset")
    from workloads.model import PRESETS

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}")
    p = PRESETS[preset]
    attention = cfg.get("attention")
    if attention == "math":
        raise ValueError("the memory model does not cover the math attention backend")
    off = (None, False, "off", "none")
    return {
        "model_cfg": shape_from_preset(preset),
        "batch": int(cfg.get("batch_size") or p.batch_size),
        "seq": int(cfg.get("seq_len") or p.seq_len),
        "precision": cfg.get("precision") if cfg.get("precision") not in off else "fp32",
        "optimizer": cfg.get("optimizer") if cfg.get("optimizer") not in off else "adamw",
        "checkpointing": cfg.get("checkpointing") if cfg.get("checkpointing") not in off else None,
        "accumulation": int(cfg.get("accumulation") or 1),
    }


_EXPLAIN = {
    "parameter": "allocator rounding (every tensor rounded up to 512 B blocks)",
    "gradient": "allocator rounding",
    "optimizer_state": "allocator rounding; first-step optimizer state is allocated lazily "
                       "(a peak in step 1 would show none); foreach temporaries can be classified here",
    "activation": "workspace (cuBLAS workspace of the first matmul is classified as an activation of "
                  "blocks.0.attn.qkv); small saved tensors (targets, positions, loss)",
    "temporary": "workspace (cuBLAS backward workspace in lm_head backward); temporaries",
    "other": "untracked bytes (allocations before capture, tiny buffers)",
    "total": "sum of the above; fragmentation shows only in reserved, not allocated, bytes",
}


def _pct(measured, predicted):
    return float("nan") if not measured else 100.0 * (predicted - measured) / measured


def measured_vs_predicted(trace, est: dict | None = None):
    """A DataFrame: level ("category" or "layer"), name, measured_bytes, predicted_bytes, error_pct,
    explanation. Categories are measured at the peak (category_at_peak); layers are the
    activation bytes alive at the peak per block (module path blocks.N...) vs the formula."""
    import pandas as pd

    from profiler.analysis.categories import category_at_peak
    from profiler.analysis.live import alive_at_peak

    if est is None:
        est = estimate(**config_from_meta(trace.meta), detail=True)
    at_peak = category_at_peak(trace)
    measured = dict(zip(at_peak["category"], at_peak["total_bytes"].astype(int)))
    rows = []
    ws = est["workspace"]
    for cat in ("parameter", "gradient", "optimizer_state", "activation", "temporary"):
        m = int(measured.get(cat, 0))
        p = int(est.get(cat, 0))
        pw = p + (ws // 2 if cat in ("activation", "temporary") and est["peak_phase"] == "loss_backward" else 0)
        rows.append(("category", cat, m, pw, _pct(m, pw), _EXPLAIN[cat]))
    other = sum(int(v) for k, v in measured.items()
                if k not in ("parameter", "gradient", "optimizer_state", "activation", "temporary"))
    rows.append(("category", "other", other, 0, float("nan"), _EXPLAIN["other"]))
    total_m = int(trace.meta.get("max_allocated_bytes") or at_peak["total_bytes"].sum())
    rows.append(("category", "peak", total_m, int(est["peak"]), _pct(total_m, est["peak"]),
                 f"predicted phase {est['peak_phase']}; " + _EXPLAIN["total"]))

    per_block = est.get("per_block")
    if per_block is not None:
        live = alive_at_peak(trace)
        act = live[live["category"] == "activation"]
        layer = act["module"].astype(str).str.extract(r"^blocks\.(\d+)(?:\.|$)")[0]
        sums = act["size_bytes"].groupby(layer).sum()
        for i, p in enumerate(per_block):
            m = int(sums.get(str(i), 0))
            err = _pct(m, p)
            why = "within 15%" if abs(err) <= 15 else "unexplained"
            if i == 0 and m > p:
                why = f"workspace: the first matmul's cuBLAS workspace ({(m - p) / MiB:.1f} MiB) is counted in block 0"
            elif abs(err) > 15 and m < p:
                why = "freed before the peak (backward had started releasing this block)"
            rows.append(("layer", f"blocks.{i}", m, int(p), err, why))
    return pd.DataFrame(rows, columns=["level", "name", "measured_bytes", "predicted_bytes", "error_pct",
                                       "explanation"])
