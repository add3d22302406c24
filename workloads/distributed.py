"""Data-parallel training under torchrun: DDP, and FSDP2 (fully_shard) as the ZeRO stages.

    torchrun --nproc-per-node 2 -m workloads.distributed --preset gpt2-small \\
        --variant fsdp-zero3 --out traces

Every rank captures its own partition of one run directory (<out>/<run_id>/rank=N/).
Each rank trains on its own batch (seeded by rank); weights start equal on all ranks.

Toggles, a flat dict as the ablation runner passes them (a missing key is off):

    model                  "gpt" (default) | "llama" (workloads/llama.py, same width and depth)
    parallel               "ddp" (default) | "fsdp"
    reshard_after_forward  fsdp: True (default; ZeRO-3-like, parameters re-gathered in
                           backward) | False (ZeRO-2-like: kept unsharded from forward to backward)
    fsdp_offload           "cpu": CPUOffloadPolicy, sharded parameters, gradients and optimizer
                           states in pinned host memory, the optimizer stepping on the CPU
    precision              "bf16": fsdp, MixedPrecisionPolicy (bf16 compute, fp32 reduce, fp32
                           shards); ddp, autocast
    checkpointing          "full": every transformer block recomputes its activations in backward
    world_size             the ranks the runner launches; checked against WORLD_SIZE
    batch_size, seq_len    per-rank batch shape, overriding the preset's

DDP keeps gradients in its communication buckets (gradient_as_bucket_view=True), so that
parameters, gradients and AdamW's two states are 16 bytes per parameter on every GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
from dataclasses import dataclass
from typing import NoReturn

import torch
import torch.distributed as dist

import profiler as capture
from profiler.errors import one_line
from workloads.model import GPT, PRESETS
from workloads.model import preset as model_preset
from workloads.toggles.checkpointing import checkpoint_modules
from workloads.toggles.optimizer import LR
from workloads.train import SHAPE_KEYS, _read_meta, _shape_overrides, empty_result, make_batch, timed_steps

# The variants of the FSDP suite; the first is the baseline.
VARIANTS: dict[str, dict] = {
    "ddp": {"parallel": "ddp"},
    "fsdp-zero3": {"parallel": "fsdp", "reshard_after_forward": True},
    "fsdp-zero2": {"parallel": "fsdp", "reshard_after_forward": False},
    "fsdp-offload": {"parallel": "fsdp", "reshard_after_forward": True, "fsdp_offload": "cpu"},
    "fsdp-bf16-ckpt": {"parallel": "fsdp", "reshard_after_forward": True, "precision": "bf16", "checkpointing": "full"},
}
MODELS = ("gpt", "llama")
KEYS = (
    "model",
    "parallel",
    "reshard_after_forward",
    "fsdp_offload",
    "precision",
    "checkpointing",
    "world_size",
) + SHAPE_KEYS


def _on(value) -> bool:
    return value not in (None, False, 0, "off", "none", "false", "False", "")


@dataclass(frozen=True, kw_only=True)
class DistToggles:
    model: str = "gpt"
    parallel: str = "ddp"
    reshard_after_forward: bool = True
    fsdp_offload: bool = False
    bf16: bool = False
    checkpointing: bool = False

    @classmethod
    def from_dict(cls, toggles: dict, *, device: str, world_size: int) -> DistToggles:
        unknown = set(toggles) - set(KEYS)
        if unknown:
            raise ValueError(f"unknown distributed toggles {sorted(unknown)}; known: {list(KEYS)}")
        model = toggles.get("model") or "gpt"
        parallel = toggles.get("parallel") or "ddp"
        if model not in MODELS:
            raise ValueError(f"model {model!r} is not one of {MODELS}")
        if parallel not in ("ddp", "fsdp"):
            raise ValueError(f"parallel {parallel!r} is not ddp or fsdp")
        precision = toggles.get("precision") or "fp32"
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"precision {precision!r}: the distributed workload runs fp32 or bf16")
        ckpt = toggles.get("checkpointing")
        if _on(ckpt) and str(ckpt) != "full":
            raise ValueError(f"checkpointing {ckpt!r}: the distributed workload supports full only")
        offload = toggles.get("fsdp_offload")
        if _on(offload) and str(offload) != "cpu":
            raise ValueError(f"fsdp_offload {offload!r}: expected cpu")
        if _on(offload) and parallel != "fsdp":
            raise ValueError("fsdp_offload needs parallel fsdp")
        if _on(offload) and not device.startswith("cuda"):
            raise ValueError("fsdp_offload moves shards from the GPU to the host: it needs cuda")
        if "reshard_after_forward" in toggles and parallel != "fsdp":
            raise ValueError("reshard_after_forward needs parallel fsdp")
        wanted = toggles.get("world_size")
        if wanted is not None and int(wanted) != world_size:
            raise ValueError(f"world_size {wanted} asked for, but {world_size} ranks are running")
        reshard = toggles.get("reshard_after_forward", True)
        return cls(
            model=model,
            parallel=parallel,
            reshard_after_forward=_on(reshard),
            fsdp_offload=_on(offload),
            bf16=precision == "bf16",
            checkpointing=_on(ckpt),
        )


def exit_rank(code: int) -> NoReturn:
    """End this rank's process with `code`, once its process group is destroyed.

    DTensor keeps every DeviceMesh that FSDP2 made in its sharding caches (Python lru caches
    and the C++ dispatch cache), and with the mesh its gloo process group, past
    destroy_process_group: the group's worker threads outlive it, and tearing them down
    while the interpreter finalizes aborts a rank at random ("terminate called without an
    active exception", SIGABRT, seen in about 1 launch in 15 on a loaded 2-core machine).
    Everything the rank writes is closed by then (the capture finalized when its `with`
    ended), so the process leaves without the interpreter's teardown."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def init_process_group(device: str) -> torch.device:
    """Join the job torchrun started; returns this rank's device."""
    if device.startswith("cuda"):
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
        backend = "nccl"
    else:
        dev, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, device_id=dev if dev.type == "cuda" else None)
    return dev


class Model:
    """The network, its transformer blocks, and its loss on a batch."""

    def __init__(self, kind: str, cfg, device: torch.device):
        self.kind = kind
        with device:
            if kind == "gpt":
                self.module = GPT(cfg)
                self.blocks = list(self.module.blocks)
            else:
                from transformers import LlamaForCausalLM

                from workloads.llama import llama_config

                config = llama_config(cfg)
                config.use_cache = False  # training: no KV cache
                self.module = LlamaForCausalLM(config)
                self.blocks = list(self.module.model.layers)

    def loss(self, idx, targets):
        if self.kind == "gpt":
            return self.module(idx, targets)[1]
        return self.module(input_ids=idx, labels=targets).loss


def shard(model: Model, toggles: DistToggles, device: torch.device):
    """Wrap for data parallelism: DDP, or fully_shard per block and then the root."""
    if toggles.checkpointing:
        checkpoint_modules(model.blocks)
    if toggles.parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [device.index] if device.type == "cuda" else None
        model.module = DDP(model.module, device_ids=ids, gradient_as_bucket_view=True)
        return
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    kwargs = dict(reshard_after_forward=toggles.reshard_after_forward)
    if toggles.bf16:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if toggles.fsdp_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=True)
    for block in model.blocks:
        fully_shard(block, **kwargs)
    fully_shard(model.module, **kwargs)


def run(
    preset: str,
    toggles: dict,
    *,
    out: str = "traces",
    name: str | None = None,
    steps: int = 6,
    device: str = "auto",
    seed: int = 0,
) -> dict:
    """Train on every rank of the job, captured; the result dict of workloads/interface.md.

    Called on every rank (under torchrun); every rank returns the job's result, with
    `ranks` listing each rank's peaks, and peak_allocated_bytes the largest of them.
    """
    result = empty_result(ranks=[])
    step_ms: list[float] = []
    prof = None
    cfg = None
    try:
        if device in (None, "auto"):
            device = "cuda" if torch.cuda.is_available() else "cpu"
        dev = init_process_group(device)
        cfg, toggles = _shape_overrides(model_preset(preset), toggles)
        parsed = DistToggles.from_dict(toggles, device=device, world_size=dist.get_world_size())
        prof = _profile(preset, cfg, toggles, dev, out=out, name=name)
        with prof:
            # `step` keeps the model, optimizer and batch alive past the capture: its trace
            # does not end with their teardown.
            step = _training_step(parsed, cfg, dev, seed=seed)
            timed_steps(step, steps, dev, result["losses"], step_ms)
        result["status"] = "ok"
    except torch.OutOfMemoryError as exc:
        result.update(status="oom", error=one_line(exc))
    except Exception as exc:  # noqa: BLE001 - the runner wants a result row, not a traceback
        result.update(status="error", error=one_line(exc))
    if prof is not None and prof.run_dir is not None:
        result["run_dir"] = str(prof.run_dir.parent)  # the job's directory, every rank beneath
    result["ranks"] = _gather(_rank_figures(result, prof, step_ms))
    _job_figures(result, cfg)
    if result["losses"]:
        result["loss"] = result["losses"][-1]
    return result


def _profile(preset: str, cfg, toggles: dict, dev: torch.device, *, out: str, name: str | None):
    """This rank's capture (not entered yet), its config naming the job's shape and toggles."""
    config = {
        "preset": preset,
        "batch_size": cfg.batch_size,
        "seq_len": cfg.seq_len,
        "world_size": dist.get_world_size(),
        **toggles,
    }
    return capture.profile(out=out, name=name or f"dist-{preset}", config=config, backend=dev.type)


def _training_step(parsed: DistToggles, cfg, dev: torch.device, *, seed: int):
    """Build and shard the model and its optimizer; the step that trains them on this rank's own batch."""
    torch.manual_seed(seed)  # equal weights on every rank
    model = Model(parsed.model, cfg, dev)
    shard(model, parsed, dev)
    opt = torch.optim.AdamW(model.module.parameters(), lr=LR)
    gen = torch.Generator(device=dev).manual_seed(seed + 1000 * dist.get_rank())
    batch = make_batch(cfg, dev, gen)  # this rank's data
    autocast = (
        torch.autocast(dev.type, dtype=torch.bfloat16)
        if parsed.bf16 and parsed.parallel == "ddp"
        else contextlib.nullcontext()
    )

    def step():
        with autocast:
            loss = model.loss(*batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def _rank_figures(result: dict, prof, step_ms: list[float]) -> dict:
    """This rank's status, peaks, partition and median step time, for the job's `ranks`."""
    mine = dict(rank=dist.get_rank() if dist.is_initialized() else 0, status=result["status"], error=result["error"])
    if prof is not None and prof.run_dir is not None:
        meta = _read_meta(prof.run_dir)
        mine.update(
            peak_allocated_bytes=meta.get("max_allocated_bytes"),
            peak_reserved_bytes=meta.get("max_reserved_bytes"),
            run_dir=str(prof.run_dir),
        )
    if step_ms:
        mine["median_step_ms"] = statistics.median(step_ms)
    return mine


def _gather(mine: dict) -> list[dict]:
    if not dist.is_initialized():
        return [mine]
    every: list = [None] * dist.get_world_size()
    try:
        dist.all_gather_object(every, mine)
    except Exception:  # noqa: BLE001 - a rank that failed to reach here: report ours alone
        return [mine]
    return every


def _job_figures(result: dict, cfg) -> None:
    """Per-GPU peaks (the largest rank's) and the slowest rank's step time."""
    ranks = result["ranks"]
    bad = [r for r in ranks if r.get("status") != "ok"]
    if bad and result["status"] == "ok":
        result.update(status=bad[0]["status"], error=f"rank {bad[0]['rank']}: {bad[0]['error']}")
    for key in ("peak_allocated_bytes", "peak_reserved_bytes"):
        values = [r[key] for r in ranks if r.get(key) is not None]
        result[key] = max(values) if values else None
    times = [r["median_step_ms"] for r in ranks if r.get("median_step_ms")]
    if times and cfg is not None:
        result["median_step_ms"] = max(times)  # the job moves at its slowest rank
        result["tokens_per_s"] = len(ranks) * cfg.batch_size * cfg.seq_len / (max(times) / 1e3)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="torchrun ... -m workloads.distributed", description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    p.add_argument("--variant", choices=sorted(VARIANTS), default="ddp")
    p.add_argument("--model", choices=MODELS, default="gpt")
    p.add_argument("--toggles", type=json.loads, default={}, help="a JSON object of extra toggles")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--out", default="traces")
    p.add_argument("--name")
    args = p.parse_args(argv)
    toggles = {**VARIANTS[args.variant], "model": args.model, **args.toggles}
    result = run(
        args.preset,
        toggles,
        out=args.out,
        name=args.name or f"{args.model}-{args.variant}",
        steps=args.steps,
        device=args.device,
    )
    if dist.is_initialized():
        if dist.get_rank() == 0:
            print(json.dumps(result, indent=1))
        dist.destroy_process_group()
    return 0 if result["status"] == "ok" else 1


if __name__ == "__main__":
    exit_rank(main())
