"""Measured per-GPU model-state memory of the DDP/FSDP2 traces, against the ZeRO formulas.

    python bench/zero.py traces/h200x2-fsdp-gpt2-small traces/h200x2-fsdp-llama

For P parameters on N GPUs, the formulas (DeepSpeed's ZeRO paper, as the project
states them): DDP 16P; ZeRO-2 4P + 16P/N; ZeRO-3 18P/N plus the largest layer.
FSDP2 with reshard_after_forward=False is the ZeRO-2-like variant, every other
FSDP2 variant the ZeRO-3-like one.

Measured, from each rank's trace: model state = parameter + gradient +
optimizer_state + unsharded_parameter + unsharded_gradient + all_gather +
reduce_scatter, all live at once, at its largest over the run (every event
counted, no downsampling); the row shows the larger of the two ranks. Its split
at that moment is shown too, so a gap can be read off: which category holds
bytes the formula does not count. Two more columns: the largest sharded state
(parameter + gradient + optimizer_state, against 16P/N: fp32 AdamW keeps 4 + 4 + 8
bytes per parameter) and the largest amount of unsharded parameters alive.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from profiler.analysis.categories import category_timeline  # noqa: E402
from profiler.trace.layout import rank_dirs  # noqa: E402
from profiler.trace.reader import load_trace  # noqa: E402

MODEL_STATE = (
    "parameter",
    "gradient",
    "optimizer_state",
    "unsharded_parameter",
    "unsharded_gradient",
    "all_gather",
    "reduce_scatter",
)
GIB = 1 << 30


def model_shape(preset: str, model: str) -> tuple[int, int, int]:
    """(parameters, parameters of the largest FSDP unit, the transformer blocks' count), from a
    model built on the meta device, wrapped as workloads/distributed.py wraps it."""
    import torch

    from workloads.distributed import Model
    from workloads.model import preset as model_preset

    m = Model(model, model_preset(preset), torch.device("meta"))
    total = sum(p.numel() for p in m.module.parameters())
    blocks = [sum(p.numel() for p in b.parameters()) for b in m.blocks]
    root = total - sum(blocks)  # embeddings, final norm, (untied) head: the root's unit
    return total, max(blocks + [root]), len(blocks)


def formula(parallel: str, reshard: bool, p: int, n: int, largest: int, unit_bytes: int) -> tuple[str, int]:
    if parallel == "ddp":
        return "DDP 16P", 16 * p
    if not reshard:
        return "ZeRO-2 4P + 16P/N", 4 * p + 16 * p // n
    return "ZeRO-3 18P/N + largest layer", 18 * p // n + unit_bytes * largest


def measure(rank_dir: Path) -> dict:
    trace = load_trace(rank_dir)
    tl = category_timeline(trace, max_points=10**12)
    cols = [c for c in MODEL_STATE if c in tl]
    state = tl[cols].sum(axis=1).to_numpy()
    at = int(np.argmax(state))
    sharded = tl[[c for c in ("parameter", "gradient", "optimizer_state") if c in tl]].sum(axis=1)
    return dict(
        bytes=int(state[at]),
        split={c: int(tl[c].iloc[at]) for c in cols},
        sharded=int(sharded.max()),
        unsharded=int(tl["unsharded_parameter"].max()) if "unsharded_parameter" in tl else 0,
        peak=int(trace.meta["max_allocated_bytes"]),
        meta=trace.meta,
    )


def rows(folders: list[str]) -> pd.DataFrame:
    out = []
    shapes: dict[tuple, tuple] = {}
    for folder in folders:
        for job in sorted(Path(folder).iterdir()):
            ranks = rank_dirs(job) if job.is_dir() else []
            if not ranks:
                continue
            measured = [measure(r) for r in ranks]
            worst = max(measured, key=lambda m: m["bytes"])
            cfg = worst["meta"]["config"]
            model = cfg.get("model", "gpt")
            key = (cfg["preset"], model)
            if key not in shapes:
                shapes[key] = model_shape(*key)
            p, largest, _ = shapes[key]
            n = int(cfg["world_size"])
            parallel = cfg.get("parallel", "ddp")
            reshard = str(cfg.get("reshard_after_forward", True)).lower() not in ("false", "0", "off")
            unit_bytes = 2 if cfg.get("precision") == "bf16" else 4
            name, expected = formula(parallel, reshard, p, n, largest, unit_bytes)
            label = (
                "ddp"
                if parallel == "ddp"
                else (
                    "fsdp-zero2"
                    if not reshard
                    else "fsdp-offload"
                    if cfg.get("fsdp_offload")
                    else "fsdp-bf16-ckpt"
                    if cfg.get("precision") == "bf16"
                    else "fsdp-zero3"
                )
            )
            out.append(
                dict(
                    model=model,
                    variant=label,
                    world_size=n,
                    params=p,
                    largest_unit=largest,
                    peak_gib=worst["peak"] / GIB,
                    model_state_gib=worst["bytes"] / GIB,
                    formula=name,
                    formula_gib=expected / GIB,
                    gap_pct=100.0 * (worst["bytes"] - expected) / expected,
                    sharded_state_gib=worst["sharded"] / GIB,
                    sixteen_p_over_n_gib=16 * p / n / GIB,
                    unsharded_param_max_gib=worst["unsharded"] / GIB,
                    **{f"{c}_gib": v / GIB for c, v in worst["split"].items()},
                )
            )
    return pd.DataFrame(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folders", nargs="+", help="folders of multi-rank runs (vramscope ablate --suite fsdp)")
    ap.add_argument("--markdown", action="store_true", help="print a Markdown table")
    args = ap.parse_args(argv)
    table = rows(args.folders)
    if table.empty:
        print("no multi-rank runs found", file=sys.stderr)
        return 2
    pd.set_option("display.width", 250)
    pd.set_option("display.max_columns", 30)
    print(
        table.to_markdown(index=False, floatfmt=".2f")
        if args.markdown
        else table.to_string(index=False, float_format=lambda v: f"{v:.2f}")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
