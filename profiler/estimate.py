"""Analytic memory model of a GPT training step (and a KV cache), and measured vs predicted.

Pure arithmetic: no torch is needed. transformers is imported lazily, only by
`shape_from_hf` for a Hugging Face config. The terms (what a block, the optimizer and a
KV cache keep, and why) are in profiler/estimate_terms.py, with the notation used here.

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

from profiler.estimate_terms import (
    OPTIMIZERS,
    PRECISION_BYTES,
    Activations,
    activations,
    block_activation_bytes,
    checkpointed_block_bytes,
    checkpointed_layers,
    kv_cache_bytes,
    optimizer_state_bytes,
)
from profiler.presets import PRESETS, ModelShape, shape_from_hf, shape_from_preset, to_shape
from profiler.trace.schema import Category

__all__ = [
    "OPTIMIZERS",
    "PRECISION_BYTES",
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
    "workspace_bytes_for",
]

MiB = 1 << 20
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
    accumulation = _checked_accumulation(batch, accumulation, precision)
    act = activations(
        shape,
        batch=batch // accumulation,
        seq=seq,
        precision=precision,
        checkpointing=checkpointing,
        flash=flash,
        dropout=dropout,
    )
    P = shape.num_params()
    held = _Held(
        parameter=4 * P,
        gradient=4 * P,
        gradient_in_forward=4 * P if accumulation > 1 else 0,
        optimizer_state=optimizer_state_bytes(shape, optimizer),
        kv_cache=kv_cache_bytes(shape, tokens=kv_tokens, batch=batch, dtype_bytes=kv_dtype_bytes) if kv_tokens else 0,
    )
    phases = _phases(
        act,
        held,
        foreach_temporary=4 * P if optimizer.startswith("adamw") else 0,
        recompute=_any_checkpointed(checkpointing, shape.n_layer),
        workspace_bytes=workspace_bytes,
    )
    peak_phase = max(phases, key=phases.__getitem__)
    out = _breakdown(act, held, phases, peak_phase, workspace_bytes)
    if detail:
        out.update(phases=phases, per_block=act.per_block, logits_forward=act.logits_forward, num_params=P)
    return out


def _checked_accumulation(batch: int, accumulation: int, precision: str) -> int:
    """The accumulation steps (1 when unset), or ValueError for an unknown precision or an uneven split."""
    if precision not in PRECISION_BYTES:
        raise ValueError(f"precision {precision!r} is not one of {', '.join(PRECISION_BYTES)}")
    accumulation = int(accumulation or 1)
    if batch % accumulation:
        raise ValueError(f"batch {batch} is not divisible by accumulation {accumulation}")
    return accumulation


@dataclass(frozen=True, slots=True)
class _Held:
    """The bytes of a step that are not activations, in bytes."""

    parameter: int
    gradient: int  # every gradient, as after backward
    gradient_in_forward: int  # the gradients already held in forward: all under accumulation, else none
    optimizer_state: int
    kv_cache: int


def _phases(
    act: Activations, held: _Held, *, foreach_temporary: int, recompute: bool, workspace_bytes: int
) -> dict[str, int]:
    """Bytes allocated at each phase's high point (see the module docstring)."""
    base = held.parameter + held.gradient_in_forward + held.optimizer_state + held.kv_cache
    after_backward = held.parameter + held.gradient + held.optimizer_state + held.kv_cache
    phases = {
        "forward_end": base + act.embed + act.blocks_total + act.ln_f + act.logits_forward + workspace_bytes // 2,
        "loss_backward": base + act.kept + act.loss_grads + workspace_bytes,
        "optimizer_step": after_backward + foreach_temporary,
    }
    if recompute:
        phases["recompute"] = after_backward + act.embed + act.blocks_total + act.full_block + workspace_bytes
    return phases


def _breakdown(act: Activations, held: _Held, phases: dict[str, int], peak_phase: str, workspace_bytes: int) -> dict:
    """estimate()'s keys: the bytes per category at the peak of `peak_phase`, and the peak."""
    in_forward = peak_phase in ("forward_end", "loss_backward")
    return {
        "parameter": held.parameter,
        "gradient": held.gradient_in_forward if in_forward else held.gradient,
        "optimizer_state": held.optimizer_state,
        "activation": _activation_at(act, peak_phase),
        "temporary": act.loss_grads if peak_phase == "loss_backward" else 0,
        "workspace": workspace_bytes,
        "kv_cache": held.kv_cache,
        "peak": phases[peak_phase],
        "peak_phase": peak_phase,
    }


def _any_checkpointed(checkpointing, n_layer: int) -> bool:
    return any(checkpointed_layers(n_layer, checkpointing))


def _activation_at(act: Activations, phase: str) -> int:
    """Activation bytes alive at the predicted peak of `phase`."""
    if phase == "loss_backward":
        return act.kept
    if phase == "forward_end":
        return act.kept - act.saved_logsoftmax + act.logits_forward
    if phase == "recompute":
        return act.embed + act.blocks_total + act.full_block
    return 0


# -- a run's config ----------------------------------------------------------------------


def workspace_bytes_for(meta: dict) -> int:
    """The cuBLAS workspace to count for a run: DEFAULT_WORKSPACE on the CUDA backend, none on the CPU."""
    return DEFAULT_WORKSPACE if meta.get("backend") == "cuda" else 0


def config_from_meta(meta: dict) -> dict:
    """estimate() keyword arguments for a run's meta.json, or ValueError naming what is not understood.
    The cuBLAS workspace is counted on the CUDA backend only (workspace_bytes_for)."""
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
        "workspace_bytes": workspace_bytes_for(meta),
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
