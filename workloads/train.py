"""Minimal training loop for the reference GPT, used by tests and benchmarks.

    python -m workloads.train --preset tiny --steps 3
"""

from __future__ import annotations

import argparse

import torch

from workloads.model import GPT, PRESETS, GPTConfig, preset

LR = 3e-4


def make_batch(
    cfg: GPTConfig, device: torch.device | str = "cpu", generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random int64 token ids ``(idx, targets)``, each of shape (batch_size, seq_len).

    A ``generator`` must live on ``device``; without one the global RNG is used.
    """
    shape = (cfg.batch_size, cfg.seq_len)
    idx = torch.randint(cfg.vocab_size, shape, dtype=torch.long, device=device, generator=generator)
    targets = torch.randint(cfg.vocab_size, shape, dtype=torch.long, device=device, generator=generator)
    return idx, targets


def build(
    cfg: GPTConfig,
    device: torch.device | str = "cpu",
    optimizer: str = "adamw",
    fused: bool | None = None,
) -> tuple[GPT, torch.optim.Optimizer]:
    """Build the model directly on ``device`` and its optimizer ("adamw" or "sgd")."""
    device = torch.device(device)
    if fused and device.type != "cuda":
        raise ValueError(f"fused=True needs a cuda device, got {device}")
    # Constructing under the device context allocates parameters in place,
    # with no CPU copy first (and makes a `meta` build instant).
    with device:
        model = GPT(cfg)
    if optimizer == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=LR, fused=fused)
    elif optimizer == "sgd":
        # Momentum gives SGD a state buffer, so both optimizers hold state.
        opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9, fused=fused)
    else:
        raise ValueError(f"unknown optimizer {optimizer!r}; expected 'adamw' or 'sgd'")
    return model, opt


def train_step(
    model: GPT,
    opt: torch.optim.Optimizer,
    batch: tuple[torch.Tensor, torch.Tensor],
    autocast_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """One forward/backward/step; returns the detached loss (no host sync)."""
    idx, targets = batch
    if autocast_dtype is not None:
        with torch.autocast(device_type=idx.device.type, dtype=autocast_dtype):
            _, loss = model(idx, targets)
    else:
        _, loss = model(idx, targets)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    cfg = preset(args.preset)
    model, opt = build(cfg, args.device)
    autocast_dtype = torch.bfloat16 if args.dtype == "bf16" else None
    for step in range(args.steps):
        batch = make_batch(cfg, args.device)
        loss = train_step(model, opt, batch, autocast_dtype)
        print(f"step {step} loss {loss.item():.4f}", flush=True)


if __name__ == "__main__":
    main()
