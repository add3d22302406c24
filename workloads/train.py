"""Training the reference GPT under memory toggles, captured by vramscope.

    python -m workloads.train --preset tiny --steps 5 --precision bf16 --checkpointing every:2 --out traces
    python -m workloads.train --preset tiny --steps 3          # no --out: no capture, a loss line per step

`run(...)` is the ablation runner's entry point (workloads/interface.md); the
toggles are in workloads/toggles/. `build`, `make_batch` and `train_step` are the
minimal loop that tests and benchmarks drive directly.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time

import torch

from profiler.capture import session as capture
from profiler.errors import one_line
from profiler.trace.meta import read_meta_lenient
from profiler.trace.schema import Phase
from workloads.model import GPT, PRESETS, GPTConfig
from workloads.model import preset as model_preset
from workloads.toggles import KEYS, TOGGLES, TrainToggles, apply_toggles, from_dict
from workloads.toggles.optimizer import LR

_FORWARD = Phase.FORWARD.value


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


class Trainer:
    """The model, optimizer and step plan that the toggles make, and one fixed batch.

    Seeded, so that two Trainers with the same config start from the same weights
    and see the same batch: their losses differ only by what the toggles change.
    """

    def __init__(self, cfg: GPTConfig, toggles: TrainToggles, seed: int = 0) -> None:
        self.cfg = cfg
        self.toggles = toggles
        self.device = torch.device(toggles.device)
        torch.manual_seed(seed)
        with self.device:
            model = GPT(cfg)
        # One batch re-used every step, so that losses are comparable across runs.
        self.batch = make_batch(cfg, self.device)
        self.model, self.optimizer, self.plan = apply_toggles(toggles, model)

    def step(self) -> torch.Tensor:
        """One optimizer step over the batch (k micro-batches under accumulation); the mean loss.

        The capture's step ends at the optimizer step (prof.step() as well, since a
        GradScaler skips optimizer.step() when it finds inf gradients).
        """
        plan, k = self.plan, self.plan.micro_batches
        losses = []
        with contextlib.ExitStack() as whole_step:
            plan.enter(whole_step, plan.step_contexts)
            for idx, targets in plan.split(self.batch):
                # Module hooks would start the phase themselves; a compiled run has none.
                capture.mark(_FORWARD)
                with contextlib.ExitStack() as forward:
                    plan.enter(forward, plan.forward_contexts)
                    # Only the loss: holding the logits through backward would keep
                    # (B, T, vocab) bytes alive that the training step never uses.
                    loss = self.model(idx, targets)[1]
                scaled = loss / k if k > 1 else loss
                (plan.scaler.scale(scaled) if plan.scaler else scaled).backward()
                losses.append(loss.detach())
        if plan.scaler:
            plan.scaler.step(self.optimizer)
            plan.scaler.update()
        else:
            self.optimizer.step()
        capture.step()
        self.optimizer.zero_grad(set_to_none=True)
        return losses[0] if k == 1 else torch.stack(losses).mean()


def resolve_device(device: str | None) -> str:
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_steps(step, steps: int, device: torch.device, losses: list, step_ms: list) -> None:
    """Call `step` (which returns the loss) `steps` times; each one's time, the device synchronized
    around it, goes to step_ms and its loss to losses."""
    for _ in range(steps):
        _sync(device)
        t0 = time.perf_counter()
        loss = step()
        _sync(device)
        step_ms.append((time.perf_counter() - t0) * 1e3)
        losses.append(loss.item())


SHAPE_KEYS = ("batch_size", "seq_len")


def _shape_overrides(cfg, toggles: dict):
    """`batch_size` and `seq_len` in the toggles override the preset's (what-if studies
    vary them); the rest are optimization toggles."""
    toggles = dict(toggles or {})
    for key in SHAPE_KEYS:
        if toggles.get(key) is not None:
            setattr(cfg, key, int(toggles.pop(key)))
    if cfg.seq_len > cfg.block_size:
        raise ValueError(f"seq_len {cfg.seq_len} exceeds the preset's block size {cfg.block_size}")
    return cfg, toggles


def run(
    preset: str,
    toggles: dict,
    *,
    out: str = "traces",
    name: str | None = None,
    steps: int = 10,
    device: str = "auto",
    seed: int = 0,
) -> dict:
    """Train `preset` for `steps` optimizer steps under `toggles`, captured; the result dict.

    The contract, keys included, is workloads/interface.md. Never raises for a failed
    run: an out-of-memory error is status "oom", anything else "error", and a capture
    that started still finalizes (with that status) and reports its peaks.
    """
    result = empty_result()
    step_ms: list[float] = []
    prof = cfg = None
    try:
        cfg, parsed, dev, prof = _start_capture(preset, toggles, out=out, name=name, device=device)
        with prof:
            trainer = Trainer(cfg, parsed, seed=seed)
            if parsed.compile is not None:
                # Without module hooks nothing meets the root module: name its modules and
                # parameters now, or parameters would count as "other".
                prof.register_model(trainer.model)
            timed_steps(trainer.step, steps, dev, result["losses"], step_ms)
        result["status"] = "ok"
    except torch.OutOfMemoryError as exc:
        result.update(status="oom", error=one_line(exc))
    except Exception as exc:  # noqa: BLE001 - the runner wants a result row, not a traceback
        result.update(status="error", error=one_line(exc))
    _fill_figures(result, prof, cfg, step_ms)
    return result


def empty_result(**extra) -> dict:
    """A result dict (workloads/interface.md) of a run that has not finished yet; `extra` keys go last."""
    return dict(
        status="error",
        run_dir=None,
        peak_allocated_bytes=None,
        peak_reserved_bytes=None,
        median_step_ms=None,
        tokens_per_s=None,
        loss=None,
        losses=[],
        error=None,
        **extra,
    )


def _start_capture(preset: str, toggles: dict, *, out: str, name: str | None, device: str):
    """The preset's shape, the parsed toggles, the device and the capture (not entered yet) of a training run."""
    device = resolve_device(device)
    cfg, toggles = _shape_overrides(model_preset(preset), toggles)
    parsed = from_dict(toggles, device=device, batch_size=cfg.batch_size)
    dev = torch.device(device)
    if parsed.compile and dev.type == "cpu":
        raise ValueError(
            "compile is not captured on cpu: dynamo skips compilation under the CPU "
            "backend's TorchDispatchMode, so the run would measure eager mode"
        )
    # Module hooks and dynamo do not mix (workloads/toggles/compile.py): a compiled run
    # is captured with phases and categories, without module attribution.
    prof = capture.profile(
        out=out,
        name=name or f"train-{preset}",
        config={"preset": preset, "batch_size": cfg.batch_size, "seq_len": cfg.seq_len, **toggles},
        backend=dev.type,
        modules=parsed.compile is None,
    )
    return cfg, parsed, dev, prof


def _fill_figures(result: dict, prof, cfg, step_ms: list[float]) -> None:
    """The run's directory and peaks from its capture, its speed from the step times, its last loss."""
    if prof is not None and prof.run_dir is not None:
        result["run_dir"] = str(prof.run_dir)
        meta = _read_meta(prof.run_dir)
        result["peak_allocated_bytes"] = meta.get("max_allocated_bytes")
        result["peak_reserved_bytes"] = meta.get("max_reserved_bytes")
    if step_ms:
        result["median_step_ms"] = statistics.median(step_ms)
        result["tokens_per_s"] = cfg.batch_size * cfg.seq_len / (result["median_step_ms"] / 1e3)
    if result["losses"]:
        result["loss"] = result["losses"][-1]


def _read_meta(run_dir) -> dict:
    return read_meta_lenient(run_dir) or {}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m workloads.train", description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="capture a trace under this folder and print the result JSON")
    p.add_argument("--name", help="the run's name (with --out)")
    t = p.add_argument_group("toggles (off when left out)")
    for toggle in TOGGLES:
        t.add_argument(*toggle.flags, dest=toggle.key, help=toggle.summary(), **toggle.cli)
    return p


def main(argv: list[str] | None = None) -> None:
    parser = _parser()
    args = parser.parse_args(argv)
    toggles = {k: getattr(args, k) for k in KEYS if getattr(args, k) is not None}
    device = resolve_device(args.device)
    if args.out:
        result = run(
            args.preset, toggles, out=args.out, name=args.name, steps=args.steps, device=device, seed=args.seed
        )
        print(json.dumps(result, indent=1))
        if result["status"] != "ok":
            sys.exit(1)
        return
    # No capture of our own: `vramscope run -m workloads.train` may be capturing this process.
    cfg = model_preset(args.preset)
    try:
        parsed = from_dict(toggles, device=device, batch_size=cfg.batch_size)
    except ValueError as exc:
        parser.error(str(exc))  # one line and the usage, no traceback
    trainer = Trainer(cfg, parsed, seed=args.seed)
    for step in range(args.steps):
        loss = trainer.step()
        print(f"step {step} loss {loss.item():.4f}", flush=True)


if __name__ == "__main__":
    main()
