"""The terms of the analytic memory model: what a block, the optimizer and a KV cache keep.

Pure arithmetic; profiler/estimate.py adds them up into the phases of a step.

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
"""

from __future__ import annotations

from dataclasses import dataclass

from profiler.presets import ModelShape

PRECISION_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
OPTIMIZERS = ("sgd", "sgd_momentum", "adamw", "adamw_fused")


def checkpointed_layers(n_layer: int, checkpointing) -> list[bool]:
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


# torch.optim's per-parameter states shaped like their parameter (AdamW's two moments, SGD's
# momentum, RMSprop's and Adadelta's averages, Adagrad's sum), and its step count: a float32
# scalar tensor per parameter (on the device only for the fused or capturable AdamW).
PARAMETER_SHAPED_STATES = frozenset(
    {"exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer", "square_avg", "acc_delta", "sum"}
)
STEP_STATE = "step"
STEP_STATE_BYTES = 4


def state_tensor_bytes(state: str, parameter_bytes: int) -> int | None:
    """Bytes of one parameter's optimizer state `state` (its torch.optim name); None when not modelled."""
    if state in PARAMETER_SHAPED_STATES:
        return parameter_bytes
    if state == STEP_STATE:
        return STEP_STATE_BYTES
    return None


def kv_cache_bytes(shape: ModelShape, *, tokens: int, batch: int, dtype_bytes: int = 2) -> int:
    """layers x 2 (K and V) x tokens x kv_heads x head_dim x dtype bytes x batch."""
    return shape.n_layer * 2 * tokens * shape.kv_heads * shape.head_dim * dtype_bytes * batch


@dataclass(frozen=True, slots=True)
class Activations:
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


def activations(
    shape: ModelShape, *, batch: int, seq: int, precision: str, checkpointing, flash: bool, dropout: bool
) -> Activations:
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
    return Activations(
        embed=4 * sbh,
        per_block=[kept_block if c else full_block for c in checkpointed_layers(shape.n_layer, checkpointing)],
        full_block=full_block,
        ln_f=ln_f,
        saved_logsoftmax=saved_logsoftmax,
        logits_forward=(e * bsV + 4 * bsV if precision != "fp32" else 4 * bsV) + saved_logsoftmax,
        loss_grads=2 * 4 * bsV,
    )
