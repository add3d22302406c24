"""Ablation suites: named configurations of one workload, the first the baseline.

A configuration is (kind, toggles): kind "train", "infer" or "dist", toggles a flat dict in
which a missing key means "off" (workloads/interface.md). A suite is a list of named
configurations whose first one is the baseline; `vary` replaces the list by the cartesian
product of some toggles' values, and `fixed` toggles are set in every one.

The rows come from the registries: the seeds suite runs each training toggle's own
`ablation` rows (workloads/toggles/), the kv suite one row per KV cache kind
(workloads/kv/), the fsdp suite workloads.distributed.VARIANTS. A new toggle or cache kind
is in the suite, the CLI's checks and the known toggles without an edit here.
workloads/ablate.py runs the configurations.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable
from dataclasses import dataclass

BASELINE = "baseline"
BASELINE_KV = "concat"  # the cache a first generate loop writes: torch.cat per token

# Training: after the baseline (fp32, unfused for-each AdamW, nothing else on: what a first
# training script does) each optimization alone, then the combinations people actually use.
# bf16 would be the usual starting point on a GPU, but then the precision rows could not be
# compared with fp32.
SEED_COMBINATIONS: list[tuple[str, dict]] = [
    ("bf16+ckpt", {"precision": "bf16", "checkpointing": "full"}),
    ("bf16+ckpt+fused", {"precision": "bf16", "checkpointing": "full", "optimizer": "adamw_fused"}),
    ("bf16+accum4+ckpt2", {"precision": "bf16", "accumulation": 4, "checkpointing": "every:2"}),
]

# Data parallelism under torchrun: DDP, then FSDP2 as ZeRO-3, ZeRO-2, with CPU offload,
# and with bf16 plus checkpointing (workloads/distributed.py). world_size is an axis:
# `--vary world_size=1,2,4` or `--set world_size=4`; rows run on 2 ranks otherwise.
DIST_WORLD_SIZE = 2


def _seeds() -> list[tuple[str, dict]]:
    from workloads.toggles import TOGGLES

    return [(BASELINE, {}), *(row for toggle in TOGGLES for row in toggle.ablation), *SEED_COMBINATIONS]


def _kv() -> list[tuple[str, dict]]:
    """The baseline cache, "none" (the whole prefix recomputed at every token), every other
    kind, and prealloc with int8 weights. Weights are the infer workload's default unless a
    row says otherwise: bf16 on CUDA (fp32 on the CPU)."""
    from workloads.kv import KINDS

    return [
        (BASELINE, {"kv": BASELINE_KV}),
        ("kv-none", {"kv": "none"}),
        *((f"kv-{kind}", {"kv": kind}) for kind in KINDS if kind != BASELINE_KV),
        ("prealloc+w-int8", {"kv": "prealloc", "weights": "int8"}),
    ]


def _fsdp() -> list[tuple[str, dict]]:
    from workloads.distributed import VARIANTS

    rows = [(name, {**toggles, "world_size": DIST_WORLD_SIZE}) for name, toggles in VARIANTS.items()]
    return [(BASELINE if name == "ddp" else name, toggles) for name, toggles in rows]


@dataclass(frozen=True, slots=True)
class Suite:
    kind: str
    """Which workload runs the rows: "train", "infer" or "dist" (workloads.run_one.KINDS)."""
    about: str
    """One line for `vramscope ablate --help`."""
    rows: Callable[[], list[tuple[str, dict]]]
    """(name, toggles) rows, the first the baseline; built when asked (the registries import torch)."""


SUITES: dict[str, Suite] = {
    "seeds": Suite("train", "training optimizations", _seeds),
    "kv": Suite("infer", "inference caches", _kv),
    "fsdp": Suite("dist", "DDP and FSDP2 under torchrun, world_size an axis", _fsdp),
}


def cuda_only() -> dict[str, str]:
    """Toggles the runner itself refuses off CUDA, and why; everything else is the workloads' own
    checks (workloads.toggles.from_dict, workloads.infer.InferConfig), so the two never disagree."""
    from workloads.toggles import TOGGLES

    return {toggle.key: toggle.cuda_only for toggle in TOGGLES if toggle.cuda_only}


@dataclass(kw_only=True, slots=True, frozen=True)
class Config:
    name: str
    """Row label; also part of the run's name."""
    kind: str
    """"train", "infer" or "dist": which workload's run() to call."""
    toggles: dict
    """Flat toggles; a missing key is off."""
    skip: str | None = None
    """Why this configuration is not run here (None: it runs)."""


# -- the matrix -----------------------------------------------------------------------


def coerce(text: str):
    """A toggle value from the command line: "4" -> 4, "none"/"off" -> None, else the text."""
    if text.lower() in ("none", "off", ""):
        return None
    try:
        return int(text)
    except ValueError:
        return text


def _clean(toggles: dict) -> dict:
    return {k: v for k, v in toggles.items() if v is not None}


def known_toggles(kind: str) -> tuple[str, ...]:
    """The toggle keys the workload of `kind` accepts."""
    if kind == "train":
        from workloads.toggles import KEYS

        return tuple(KEYS)
    if kind == "dist":
        from workloads.distributed import KEYS

        return KEYS
    from workloads.infer import RUNNER_KEYS, InferConfig

    fixed = ("preset", "device", "steps")
    return tuple(f.name for f in dataclasses.fields(InferConfig) if f.name not in fixed) + tuple(RUNNER_KEYS)


def skip_reason(kind: str, toggles: dict, *, preset: str, steps: int, device: str) -> str | None:
    """Why `toggles` cannot run on `device` (the workload's own check, in one line), or None."""
    if device != "cuda":
        for key, why in cuda_only().items():
            if toggles.get(key) is not None:
                return f"{key}={toggles[key]} needs CUDA ({why})"
    try:  # the checks the child would make first, without building a model
        if kind == "train":
            from profiler.presets import preset as gpt_preset
            from workloads.toggles import from_dict

            from_dict(toggles, device=device, batch_size=gpt_preset(preset).batch_size)
        elif kind == "dist":
            return _dist_skip(toggles, device)
        else:
            from workloads.infer import RUNNER_KEYS, InferConfig

            InferConfig.from_toggles(
                preset, {k: v for k, v in toggles.items() if k not in RUNNER_KEYS}, steps=steps, device=device
            )
    except ValueError as exc:
        return " ".join(str(exc).split())
    return None


def world_size(toggles: dict) -> int:
    return int(toggles.get("world_size") or DIST_WORLD_SIZE)


def _dist_skip(toggles: dict, device: str) -> str | None:
    from workloads.distributed import DistToggles

    ranks = world_size(toggles)
    if ranks < 1:
        return f"world_size {ranks}: at least one rank"
    DistToggles.from_dict(toggles, device=device, world_size=ranks)
    if device == "cuda":
        import torch

        if torch.cuda.device_count() < ranks:
            return f"world_size {ranks} needs {ranks} GPUs; this machine has {torch.cuda.device_count()}"
    return None


def product(vary: dict[str, list]) -> list[dict]:
    """The cartesian product of the axes, first axis slowest: {a: [1, 2], b: [x]} -> [{a: 1, b: x}, {a: 2, b: x}]."""
    keys = list(vary)
    return [dict(zip(keys, values)) for values in itertools.product(*(vary[k] for k in keys))]


def _label(toggles: dict) -> str:
    return ",".join(f"{k}={'off' if v is None else v}" for k, v in toggles.items()) or BASELINE


def configurations(
    suite: str,
    *,
    vary: dict[str, list] | None = None,
    fixed: dict | None = None,
    preset: str = "tiny",
    steps: int = 5,
    device: str = "cpu",
) -> list[Config]:
    """The suite's configurations (or the product of `vary`), first = baseline.

    `fixed` toggles are set in every configuration, under the row's own: `fixed` moves the
    baseline, and a suite row that sets the same toggle still tests its own value. A `vary`
    product's first combination (every axis at its first value) is the baseline. A toggle
    the workload does not know raises ValueError; one it refuses here (on this device, in
    this combination) makes a skipped row with the workload's reason.
    """
    if suite not in SUITES:
        raise ValueError(f"unknown suite {suite!r}; known suites: {', '.join(SUITES)}")
    kind = SUITES[suite].kind
    fixed = dict(fixed or {})
    unknown = sorted((set(fixed) | set(vary or {})) - set(known_toggles(kind)))
    if unknown:
        raise ValueError(f"unknown {kind} toggle(s) {', '.join(unknown)}; known: {', '.join(known_toggles(kind))}")
    named = [(_label(combo), combo) for combo in product(vary)] if vary else SUITES[suite].rows()
    configs = []
    for name, toggles in named:
        merged = _clean({**fixed, **toggles})  # a row's own toggles win: they are what it tests
        skip = skip_reason(kind, merged, preset=preset, steps=steps, device=device)
        configs.append(Config(name=name, kind=kind, toggles=merged, skip=skip))
    return configs
