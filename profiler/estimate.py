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

from profiler.presets import PRESETS, ModelShape, shape_from_hf, shape_from_preset, to_shape
from profiler.trace.schema import Category

__all__ = [
    "ModelShape",
    "block_activation_bytes",
    "checkpointed_block_bytes",
    "config_from_meta",
    "estimate",
    "kv_cache_bytes",
    "measured_vs_predicted",
    "optimizer_state_bytes",
    "shape_from_hf",
    "shape_from_preset",
    "to_shape",
]

MiB = 1 << 20
PRECISION_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
OPTIMIZERS = ("sgd", "sgd_momentum", "adamw", "adamw_fused")
DEFAULT_WORKSPACE = 65 * MiB
# The trace categories the formulas predict a training step's bytes in; measured against a run,
# the bytes of every other category (FSDP's, a KV cache, ...) are reported together as "other".
PREDICTED = tuple(
    c.value
    for c in (Category.PARAMETER, Category.GRADIENT, Category.OPTIMIZER_STATE, Category.ACTIVATION, Category.TEMPORARY)
)
# estimate()'s bytes keys, in the order the CLI prints them: the categories, then what adds to them.
BREAKDOWN = (*PREDICTED, "workspace", Category.KV_CACHE.value)
# Run-config keys the model understands; anything else (offload, ...) is refused.
UNDERSTOOD_KEYS = {
    "preset",
    "precision",
    "checkpointing",
    "accumulation",
    "optimizer",
    "attention",
    "compile",
    "alloc_conf",
    "steps",
    "device",
    "seed",
    "batch_size",
    "seq_len",
    "tokens_per_step",
}  # tokens_per_step is derived (batch x seq), not a toggle


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


def block_activation_bytes(
    shape: ModelShape, *, batch: int, seq: int, precision: str = "fp32", flash: bool = True, dropout: bool = False
) -> int:
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


def checkpointed_block_bytes(shape: ModelShape, *, batch: int, seq: int, precision: str, selective: bool) -> int:
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


@dataclass(frozen=True, slots=True)
class _Activations:
    """A micro-batch's activation terms, in bytes (see the module docstring)."""

    embed: int  # wte(idx) + wpe(pos), fp32 (block 0's input)
    per_block: list[int]  # what each block keeps for backward, checkpointed or not
    full_block: int  # one un-checkpointed block: what a recompute brings back
    ln_f: int
    saved_logsoftmax: int
    logits_forward: int  # logits, their fp32 copy and the saved log-softmax at the end of forward
    loss_grads: int  # the two b*s*V fp32 gradients of the loss backward

    @property
    def blocks_total(self) -> int:
        return sum(self.per_block)

    @property
    def kept(self) -> int:
        """Everything saved for backward once the logits are gone."""
        return self.embed + self.blocks_total + self.ln_f + self.saved_logsoftmax


def _activations(
    shape: ModelShape, *, batch: int, seq: int, precision: str, checkpointing, flash: bool, dropout: bool
) -> _Activations:
    b, s, h, V = batch, seq, shape.n_embd, shape.vocab_size
    e = PRECISION_BYTES[precision]
    sbh, bsV = s * b * h, b * s * V
    full_block = block_activation_bytes(shape, batch=b, seq=s, precision=precision, flash=flash, dropout=dropout)
    kept_block = checkpointed_block_bytes(
        shape, batch=b, seq=s, precision=precision, selective=str(checkpointing) == "selective"
    )
    if precision == "fp32":
        ln_f = 4 * sbh + 2 * b * s * 4  # output (lm_head input) + mean/rstd
    else:
        ln_f = 2 * sbh + 2 * b * s * 4 + 2 * V * h  # bf16 cast + stats + bf16 copy of the tied weight
    saved_logsoftmax = 4 * bsV
    return _Activations(
        embed=4 * sbh,
        per_block=[kept_block if c else full_block for c in _checkpointed(shape.n_layer, checkpointing)],
        full_block=full_block,
        ln_f=ln_f,
        saved_logsoftmax=saved_logsoftmax,
        logits_forward=(e * bsV + 4 * bsV if precision != "fp32" else 4 * bsV) + saved_logsoftmax,
        loss_grads=2 * 4 * bsV,
    )


def estimate(
    model_cfg,
    *,
    batch: int,
    seq: int,
    precision: str = "fp32",
    optimizer: str = "adamw",
    checkpointing=None,
    accumulation: int = 1,
    kv_tokens: int = 0,
    kv_dtype_bytes: int = 2,
    flash: bool = True,
    dropout: bool = False,
    workspace_bytes: int = DEFAULT_WORKSPACE,
    detail: bool = False,
) -> dict:
    """Predicted bytes per category at the predicted peak, and "peak".

    model_cfg: a ModelShape, a preset name, a workloads GPTConfig, a transformers config or a dict
    of HF keys. batch is the sequences per optimizer step; each micro-batch is batch/accumulation.
    Keys: BREAKDOWN (parameter, gradient, optimizer_state, activation, temporary, workspace,
    kv_cache), peak and peak_phase (and, with detail=True, "phases", "per_block",
    "logits_forward" and "num_params"). See the module docstring.
    """
    shape = to_shape(model_cfg)
    if precision not in PRECISION_BYTES:
        raise ValueError(f"precision {precision!r} is not one of {', '.join(PRECISION_BYTES)}")
    accumulation = int(accumulation or 1)
    if batch % accumulation:
        raise ValueError(f"batch {batch} is not divisible by accumulation {accumulation}")
    act = _activations(
        shape,
        batch=batch // accumulation,
        seq=seq,
        precision=precision,
        checkpointing=checkpointing,
        flash=flash,
        dropout=dropout,
    )
    P = shape.num_params()
    params = grads_full = 4 * P
    opt = optimizer_state_bytes(shape, optimizer)
    g_acc = grads_full if accumulation > 1 else 0
    kv = kv_cache_bytes(shape, tokens=kv_tokens, batch=batch, dtype_bytes=kv_dtype_bytes) if kv_tokens else 0

    base = params + g_acc + opt + kv
    phases = {
        "forward_end": base + act.embed + act.blocks_total + act.ln_f + act.logits_forward + workspace_bytes // 2,
        "loss_backward": base + act.kept + act.loss_grads + workspace_bytes,
        "optimizer_step": params + grads_full + opt + kv + (4 * P if optimizer.startswith("adamw") else 0),
    }
    if _any_checkpointed(checkpointing, shape.n_layer):
        phases["recompute"] = (
            params + grads_full + opt + kv + act.embed + act.blocks_total + act.full_block + workspace_bytes
        )
    peak_phase = max(phases, key=phases.get)
    out = {
        "parameter": params,
        "gradient": g_acc if peak_phase in ("forward_end", "loss_backward") else grads_full,
        "optimizer_state": opt,
        "activation": _activation_at(act, peak_phase),
        "temporary": act.loss_grads if peak_phase == "loss_backward" else 0,
        "workspace": workspace_bytes,
        "kv_cache": kv,
        "peak": phases[peak_phase],
        "peak_phase": peak_phase,
    }
    if detail:
        out.update(phases=phases, per_block=act.per_block, logits_forward=act.logits_forward, num_params=P)
    return out


def _any_checkpointed(checkpointing, n_layer: int) -> bool:
    return any(_checkpointed(n_layer, checkpointing))


def _activation_at(act: _Activations, phase: str) -> int:
    """Activation bytes alive at the predicted peak of `phase`."""
    if phase == "loss_backward":
        return act.kept
    if phase == "forward_end":
        return act.kept - act.saved_logsoftmax + act.logits_forward
    if phase == "recompute":
        return act.embed + act.blocks_total + act.full_block
    return 0


# -- a run's config ----------------------------------------------------------------------


def config_from_meta(meta: dict) -> dict:
    """estimate() keyword arguments for a run's meta.json, or ValueError naming what is not understood."""
    cfg = dict(meta.get("config") or {})
    unknown = sorted(k for k, v in cfg.items() if k not in UNDERSTOOD_KEYS and v not in (None, False, "off", "none"))
    if unknown:
        raise ValueError(f"the memory model does not understand toggle(s) {', '.join(unknown)}")
    preset = cfg.get("preset")
    if not preset:
        raise ValueError("the run's config names no preset")
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


# Why measured and predicted differ: per PREDICTED category, for "other" and for the peak.
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
    # The loss backward's cuBLAS workspace is classified as an activation and a temporary.
    split_workspace = (Category.ACTIVATION.value, Category.TEMPORARY.value)
    for cat in PREDICTED:
        m = int(measured.get(cat, 0))
        p = int(est.get(cat, 0))
        pw = p + (ws // 2 if cat in split_workspace and est["peak_phase"] == "loss_backward" else 0)
        rows.append(("category", cat, m, pw, _pct(m, pw), _EXPLAIN[cat]))
    other = sum(int(v) for k, v in measured.items() if k not in PREDICTED)
    rows.append(("category", Category.OTHER.value, other, 0, float("nan"), _EXPLAIN["other"]))
    total_m = int(trace.meta.get("max_allocated_bytes") or at_peak["total_bytes"].sum())
    rows.append(
        (
            "category",
            "peak",
            total_m,
            int(est["peak"]),
            _pct(total_m, est["peak"]),
            f"predicted phase {est['peak_phase']}; " + _EXPLAIN["total"],
        )
    )

    per_block = est.get("per_block")
    if per_block is not None:
        live = alive_at_peak(trace)
        act = live[live["category"] == Category.ACTIVATION.value]
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
    return pd.DataFrame(
        rows, columns=["level", "name", "measured_bytes", "predicted_bytes", "error_pct", "explanation"]
    )
