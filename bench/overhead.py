"""What capture costs: median step time with vs without it, in one process.

    python bench/overhead.py [--preset gpt2-small] [--steps 20] [--rounds 3]

Workload: the preset in bf16 autocast with fused AdamW (CUDA). Each variant
runs in alternating rounds with the uncaptured baseline, so drift in clocks
or temperature hits both. Printed as ratios to the baseline's median step
time; the mean ratio is printed too, because per-step drains are part of the
cost even where the median hides them. MemTracker and torch.profiler are
the anchors.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workloads.model import preset  # noqa: E402
from workloads.train import build, make_batch, train_step  # noqa: E402


def _timed_steps(run_step, n: int, per_step=None) -> list[float]:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        run_step()
        times.append(time.perf_counter() - t)
        if per_step:
            per_step()
    return times


def _history_only():
    @contextlib.contextmanager
    def ctx():
        torch.cuda.memory._record_memory_history("all", context="all", stacks="python")
        try:
            yield None
        finally:
            torch.cuda.memory._record_memory_history(None)

    return ctx()


def _vramscope(out, stacks=True, modules=True):
    import profiler

    return profiler.profile(out=out, name="overhead", stacks=stacks, modules=modules)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="gpt2-small")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--anchor-steps", type=int, default=4, help="steps for the slow anchors")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/overhead.py needs a CUDA device", file=sys.stderr)
        return 2
    cfg = preset(args.preset)
    torch.manual_seed(0)
    model, opt = build(cfg, device="cuda", fused=True)
    batch = make_batch(cfg, device="cuda")

    def step():
        train_step(model, opt, batch, autocast_dtype=torch.bfloat16).item()

    _timed_steps(step, 5)  # warm-up: kernels, autotuning, optimizer state
    out = Path(tempfile.mkdtemp(prefix="vramscope-bench-"))
    variants = {
        "history only (torch, python stacks)": _history_only,
        "vramscope, no stacks, no modules": lambda: _vramscope(out, stacks=False, modules=False),
        "vramscope, no stacks": lambda: _vramscope(out, stacks=False),
        "vramscope, full capture": lambda: _vramscope(out),
    }
    base: list[float] = []
    results: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.rounds):
        base += _timed_steps(step, args.steps)
        for name, make in variants.items():
            with make():
                results[name] += _timed_steps(step, args.steps)

    # Anchors: few steps, they are slow.
    from torch.distributed._tools.mem_tracker import MemTracker

    mt = MemTracker()
    mt.track_external(model, opt)
    with mt:
        results["MemTracker"] = _timed_steps(step, args.anchor_steps, per_step=mt.reset_mod_stats)
    prof = torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA],
        profile_memory=True,
        record_shapes=True,
        with_stack=True,
    )
    with prof:
        results["torch.profiler(profile_memory=True)"] = _timed_steps(step, args.anchor_steps)

    b_med, b_mean = statistics.median(base), statistics.mean(base)
    print(
        f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  preset {args.preset} "
        f"bf16 fused AdamW, batch {cfg.batch_size}x{cfg.seq_len}"
    )
    print(f"baseline: median {b_med * 1e3:.2f} ms/step over {len(base)} steps")
    print(f"{'variant':40s} {'median ms':>10s} {'ratio':>7s} {'mean ratio':>11s}")
    for name, times in results.items():
        med = statistics.median(times)
        print(f"{name:40s} {med * 1e3:10.2f} {med / b_med:6.3f}x {statistics.mean(times) / b_mean:10.3f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
