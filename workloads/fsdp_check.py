"""FSDP categories against torch's own FSDPMemTracker, one training step each.

    torchrun --nproc-per-node 2 -m workloads.fsdp_check --preset gpt2-small \\
        --variant fsdp-zero3 --json check.json

On every rank: a sharded model trains one step under vramscope's capture (which
starts before the model is built, as in the workloads), then another one (same
weights, same batch) trains one step under FSDPMemTracker. Each tool's bytes per
category are set side by side at three moments: the step's peak (the end of
forward, as a rule), after backward (sharded gradients, reduce-scatter buffers
still held) and after the optimizer step (AdamW's states, before zero_grad); rank 0 prints the table and
writes every rank's rows as JSON.

vramscope goes first, in a process that has only made the batch and warmed up
cuBLAS: anything the first model left behind would be memory that FSDPMemTracker
never sees but the allocator counts. The warm-up (a small forward and backward,
also under bf16 autocast) makes cuBLAS's workspaces for the main thread and for
autograd's thread before either capture. Those workspaces are allocator blocks
that no tensor owns: vramscope counts them, as "other" (they pre-date the
capture), FSDPMemTracker cannot. So "other" is shown and not held to the
tolerance, and the totals are compared without it (and without the inputs).
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time

import numpy as np
import torch
import torch.distributed as dist

import profiler as capture
from profiler.analysis.live import breakdown, live_at
from profiler.analysis.timeline import memory_timeline, peak
from profiler.trace.reader import load_trace
from workloads.distributed import VARIANTS, DistToggles, Model, exit_rank, init_process_group, shard
from workloads.model import PRESETS
from workloads.model import preset as model_preset
from workloads.toggles.optimizer import LR
from workloads.train import make_batch

RECOMPUTED = "activation (recompute)"
TRACKED = "every category but other"
# Rows: (label, vramscope categories, FSDPMemTracker reference types, held to the tolerance).
# FSDPMemTracker names a full gradient "Unsharded Grad" only when its group's
# post-backward starts; at a peak inside backward, gradients not yet reduced are
# still "Temp" there, while vramscope names them from their whole lifetime. The
# two are compared together, and shown apart. Likewise for activations recomputed
# by checkpointing inside a block: FSDPMemTracker counts them as activations only
# when FSDP's own pre-forward re-runs (checkpoint_wrapper outside fully_shard), and
# as "Temp" otherwise, which is how the workload checkpoints.
ROWS = [
    ("parameter", ("parameter",), ("Sharded Param", "Buffer"), True),
    ("unsharded_parameter", ("unsharded_parameter",), ("Unsharded Param",), True),
    ("gradient", ("gradient",), ("Sharded Grad",), True),
    ("all_gather", ("all_gather",), ("All Gather",), True),
    ("reduce_scatter", ("reduce_scatter",), ("Reduce Scatter",), True),
    ("optimizer_state", ("optimizer_state",), ("OptState",), True),
    ("activation", ("activation",), ("Activation",), True),
    (
        "temporary + unsharded_gradient + recomputed",
        ("temporary", "unsharded_gradient", RECOMPUTED),
        ("Temp", "Unsharded Grad"),
        True,
    ),
    ("  temporary", ("temporary",), ("Temp",), False),
    ("  unsharded_gradient", ("unsharded_gradient",), ("Unsharded Grad",), False),
    ("  recomputed activation", (RECOMPUTED,), (), False),
    ("other (inputs; cuBLAS workspaces)", ("other",), ("Inputs",), False),
    ("total without other", TRACKED, ("Total", "-Inputs"), True),
]
TOLERANCE_PCT = 5.0
# Rows under this share (0.1%) of the step's peak are listed but not held to the tolerance:
# a megabyte of difference at a moment when the GPU holds almost nothing (CPU
# offload, after backward) is a large percentage of nothing.
MATERIAL_SHARE = 0.001


def _fresh(toggles: DistToggles, cfg, device, seed: int):
    torch.manual_seed(seed)
    model = Model(toggles.model, cfg, device)
    shard(model, toggles, device)
    opt = torch.optim.AdamW(model.module.parameters(), lr=LR)
    return model, opt


def _step(model: Model, opt, batch, after_backward=None, after_optimizer=None) -> None:
    model.loss(*batch).backward()
    # The last reduce-scatter may still hold its buffers on the collective's own thread
    # (gloo runs async): let every collective finish before the moment is taken.
    dist.barrier()
    if after_backward:
        after_backward()
    opt.step()
    if after_optimizer:
        after_optimizer()
    opt.zero_grad(set_to_none=True)


def _release(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


MOMENTS = ("step peak", "after backward", "after optimizer step")


def _by_name(snapshot: dict, device) -> dict[str, int]:
    key = device if device in snapshot else next(iter(snapshot))
    return {str(getattr(k, "value", k)): int(v) for k, v in snapshot[key].items()}


def _settled(read, tries: int = 200):
    """read() once two reads 5 ms apart agree. gloo runs collectives on threads of its own, which
    let go of a finished collective's buffers a moment after its wait returned: a snapshot taken
    in that moment would count a buffer that the next instant frees."""
    last = read()
    for _ in range(tries):
        time.sleep(0.005)
        now = read()
        if now == last:
            break
        last = now
    return last


def theirs(toggles, cfg, device, batch, seed) -> dict[str, dict[str, int]]:
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker

    model, opt = _fresh(toggles, cfg, device, seed)
    tracker = FSDPMemTracker(model.module, opt)
    tracker.track_inputs(batch)
    out = {}

    def moment(name):
        return lambda: out.__setitem__(name, _settled(lambda: _by_name(tracker.get_tracker_snapshot(), device)))

    with tracker:
        _step(model, opt, batch, moment("after backward"), moment("after optimizer step"))
    out["step peak"] = _by_name(tracker.get_tracker_snapshot("peak"), device)
    return out


def _categories(trace, event_index: int) -> dict[str, int]:
    live = live_at(trace, event_index)
    category = live["category"].astype(object).where(live["category"].notna(), "other")
    recomputed = (category == "activation") & (live["phase"].astype(object) == "recompute")
    at = breakdown(live.assign(category=category.where(~recomputed, RECOMPUTED)), "category")
    return dict(zip(at["category"].astype(str), at["total_bytes"].astype(int)))


def ours(toggles, cfg, device, batch, seed, out_dir) -> tuple[dict[str, dict[str, int]], list[dict[str, int]], int]:
    # On the CPU, the storage-tracking path: FSDPMemTracker counts tensor storages too.
    # The native CPU path counts allocator blocks, some that no tensor owns (5 KB of 1.1 MB
    # more at the bf16-ckpt peak), and the reduce-scatter buffers that gloo's threads free
    # as their work ends, at moments that differ from one run to the next.
    path = "python" if device.type == "cpu" else "auto"
    with capture.profile(out=out_dir, name="fsdp-check", backend=device.type, capture_path=path) as prof:
        model, opt = _fresh(toggles, cfg, device, seed)
        _step(model, opt, batch)
    del model, opt
    _release(device)
    trace = load_trace(prof.run_dir)
    ev = trace.events
    in_step = np.flatnonzero(ev["step"].to_numpy() == 0)  # the optimizer step ends step 0
    optimizer = np.flatnonzero((ev["phase"].astype(object) == "optimizer").to_numpy())
    moments = {
        "step peak": _categories(trace, peak(trace).event_index),
        "after optimizer step": _categories(trace, int(in_step[-1])),
    }
    # The last event before the optimizer's first: backward is over. (With offload the
    # optimizer steps on the host and makes no device event; then this moment is the next.)
    moments["after backward"] = (
        _categories(trace, int(optimizer[0]) - 1) if len(optimizer) else moments["after optimizer step"]
    )
    near = [_categories(trace, int(i)) for i in _near_peaks(trace, in_step, peak(trace).event_index)]
    return moments, near, int(trace.meta["max_allocated_bytes"])


# The highest local maxima of the step's allocated bytes are candidates for the moment that
# FSDPMemTracker calls its peak. The two tools capture two runs of the step, and with gloo's
# collectives on threads of their own, whether a prefetched all-gather or a reduce-scatter
# buffer (one made on gloo's thread is "other" to both tools) is alive at a moment varies from
# run to run: moments swap places as the peak between the two captures.
MAX_NEAR_PEAKS = 16


def _near_peaks(trace, in_step: np.ndarray, peak_index: int) -> list[int]:
    """Event indices of the step's highest local maxima of allocated bytes, its peak first."""
    allocated = memory_timeline(trace)["allocated_bytes"].to_numpy()[in_step]
    local_max = (allocated >= np.r_[allocated[1:], -1]) & (allocated > np.r_[-1, allocated[:-1]])
    order = np.argsort(-allocated[local_max], kind="stable")[:MAX_NEAR_PEAKS]
    return list(dict.fromkeys([peak_index, *in_step[local_max][order].tolist()]))


def table(mine: dict[str, int], tracker: dict[str, int], step_peak: int) -> list[dict]:
    total = max(step_peak, 1)
    rows = []
    for label, cats, refs, held in ROWS:
        if cats == TRACKED:
            a = sum(v for c, v in mine.items() if c != "other")
        else:
            a = sum(mine.get(c, 0) for c in cats)
        # A reference type written "-Name" is subtracted.
        b = sum(-tracker.get(r[1:], 0) if r.startswith("-") else tracker.get(r, 0) for r in refs)
        diff = 100.0 * (a - b) / b if b else (0.0 if a == 0 else float("inf"))
        material = held and max(a, b) >= MATERIAL_SHARE * total
        rows.append(
            dict(
                category=label,
                vramscope=a,
                fsdp_mem_tracker=b,
                diff_pct=diff,
                held=material,
                ok=(not material) or abs(diff) <= TOLERANCE_PCT,
            )
        )
    return rows


def warm_up(device: torch.device) -> None:
    """cuBLAS handles and workspaces for this thread and autograd's, fp32 and bf16."""
    weight = torch.randn(64, 64, device=device, requires_grad=True)
    x = torch.randn(8, 64, device=device)
    (x @ weight).sum().backward()
    with torch.autocast(device.type, dtype=torch.bfloat16):
        (x @ weight).float().sum().backward()
    _release(device)


def _distance(rows: list[dict]) -> int:
    """Bytes the two tools disagree by over the categories (not their sub-rows, inputs or total)."""
    top = [r for r in rows if not r["category"].startswith(" ") and r["category"] not in _NOT_SUMMED]
    return sum(abs(r["vramscope"] - r["fsdp_mem_tracker"]) for r in top)


_NOT_SUMMED = ("other (inputs; cuBLAS workspaces)", "total without other")


def evaluate(report: dict) -> bool:
    """Add each rank's tables (from the raw figures); whether every held row is in tolerance.

    The step's peak is compared at the moment of vramscope's capture that is FSDPMemTracker's
    peak (see MAX_NEAR_PEAKS): of the highest local maxima, the one whose categories match best.
    """
    for rank in report["ranks"]:
        rank["tables"] = {m: table(rank["vramscope_raw"][m], rank["tracker_raw"][m], rank["peak"]) for m in MOMENTS}
        candidates = rank.get("near_peaks") or [rank["vramscope_raw"]["step peak"]]
        tracker_peak = rank["tracker_raw"]["step peak"]
        tables = [table(c, tracker_peak, rank["peak"]) for c in candidates]
        best = min(range(len(tables)), key=lambda i: _distance(tables[i]))
        rank["tables"]["step peak"], rank["step_peak_moment"] = tables[best], best
    return all(r["ok"] for rank in report["ranks"] for rows in rank["tables"].values() for r in rows)


def render(report: dict) -> str:
    lines = []
    for rank in report["ranks"]:
        lines.append(
            f"rank {rank['rank']}: {report['model']} {report['variant']} on {report['device']} "
            f"(torch {report['torch_version']}), vramscope peak {rank['peak']:,} B"
        )
        if rank.get("step_peak_moment"):
            lines.append("  (FSDPMemTracker's peak is another moment of vramscope's capture: compared there)")
        for moment, rows in rank["tables"].items():
            lines.append(f"  {moment + ':':42s} {'vramscope':>15s} {'FSDPMemTracker':>15s} {'diff %':>8s}")
            for r in rows:
                mark = "" if r["ok"] else "  <-- over tolerance"
                held = "" if r["held"] or r["ok"] is False else "  (not held)"
                lines.append(
                    f"    {r['category']:42s} {r['vramscope']:15,d} {r['fsdp_mem_tracker']:15,d} "
                    f"{r['diff_pct']:8.2f}{mark}{held}"
                )
    return "\n".join(lines)


def recheck(path) -> int:
    """Re-evaluate a saved report (no GPU needed): print its tables; 0 when all hold."""
    with open(path) as f:
        report = json.load(f)
    ok = evaluate(report)
    print(render(report))
    return 0 if ok else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="torchrun ... -m workloads.fsdp_check", description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    p.add_argument("--variant", default="fsdp-zero3", choices=[v for v in VARIANTS if v != "ddp"])
    p.add_argument("--model", default="gpt", choices=("gpt", "llama"))
    p.add_argument("--device", default="auto")
    p.add_argument("--json", help="write every rank's table here (rank 0)")
    p.add_argument("--keep", help="keep vramscope's trace under this directory")
    p.add_argument("--report", help="re-evaluate a saved --json report instead of running (no torchrun)")
    args = p.parse_args(argv)
    if args.report:
        return recheck(args.report)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dev = init_process_group(device)
    toggles = DistToggles.from_dict(
        {**VARIANTS[args.variant], "model": args.model}, device=device, world_size=dist.get_world_size()
    )
    cfg = model_preset(args.preset)
    gen = torch.Generator(device=dev).manual_seed(1000 + dist.get_rank())
    batch = make_batch(cfg, dev, gen)
    warm_up(dev)
    with tempfile.TemporaryDirectory(prefix="vramscope-fsdp-check-") as tmp:
        mine, near_peaks, peak = ours(toggles, cfg, dev, batch, 0, args.keep or tmp)
    tracker = theirs(toggles, cfg, dev, batch, seed=0)
    every: list = [None] * dist.get_world_size()
    mine_all = dict(rank=dist.get_rank(), peak=peak, tracker_raw=tracker, vramscope_raw=mine, near_peaks=near_peaks)
    dist.all_gather_object(every, mine_all)
    report = dict(
        preset=args.preset,
        model=args.model,
        variant=args.variant,
        device=device,
        torch_version=torch.__version__,
        ranks=every,
    )
    ok = evaluate(report)
    if dist.get_rank() == 0:
        print(render(report))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(report, f, indent=1)
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    exit_rank(main())  # see exit_rank: a rank must not tear down gloo threads at interpreter exit
