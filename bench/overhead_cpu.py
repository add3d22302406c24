"""What the CPU backend costs: step time with vs without capture, in one process.

    python bench/overhead_cpu.py [--steps 8] [--rounds 12] [--capture-path auto|native|python]
                                 [--json bench/results/overhead_cpu_native.json]

Workload: a nanoGPT-style LM (4 layers, width 128, vocabulary 512, batch 8x64)
trained with AdamW on the CPU, one intra-op thread (torch.set_num_threads(1)),
so that one thread does all the work (CPU backward runs on the calling thread)
and its CPU time is the step's whole cost. Rounds alternate: `steps` plain steps,
then `steps` steps inside a fresh full capture (events, stacks, modules, phases,
categories: every default on; `--capture-path` picks the native tracker or the
dispatch-mode backend, "python"), then `steps` steps under a dispatch mode that
only calls each op (the floor any dispatch-mode tracker pays).

Two clocks: wall time (what a user feels on an idle machine) and the training
thread's CPU time (time.thread_time), which other processes on a shared machine
do not inflate. The headline ratios use the clock named by `--clock` (default:
thread), and both sets are written.

Ratios: median to median and mean to mean, over every step but the first of each
captured round (a capture's first step records the model's parameters once);
the worst step is the slowest captured step (that first one left out) over the
baseline's median. The first steps are reported on their own.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from profiler.presets import GPTConfig  # noqa: E402
from workloads.model import GPT  # noqa: E402
from workloads.train import make_batch, train_step  # noqa: E402

CONFIG = GPTConfig(n_layer=4, n_head=4, n_embd=128, vocab_size=512, block_size=64, batch_size=8, seq_len=64)
CLOCKS = {"thread": time.thread_time, "wall": time.perf_counter}


class _CallOnly(TorchDispatchMode):
    """The floor of any dispatch-mode tracker: each op goes through Python, nothing else."""

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        return False  # as the CPU backend's mode: no dynamo-disabling wrapper per op

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def _steps(run_step, n: int) -> list[tuple[float, float]]:
    """(thread seconds, wall seconds) of each of `n` steps."""
    out = []
    for _ in range(n):
        t, w = time.thread_time(), time.perf_counter()
        run_step()
        out.append((time.thread_time() - t, time.perf_counter() - w))
    return out


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _ratios(base: list[float], captured_rounds: list[list[float]]) -> dict:
    rest = [t for r in captured_rounds for t in r[1:]]
    b_med = statistics.median(base)
    return dict(
        median_ratio=statistics.median(rest) / b_med,
        mean_ratio=statistics.mean(rest) / statistics.mean(base),
        worst_step_ratio=max(rest) / b_med,
        first_step_ratio=statistics.median(r[0] for r in captured_rounds) / b_med,
        base_ms_median=b_med * 1e3,
        captured_ms_median=statistics.median(rest) * 1e3,
    )


def cpu_rows(
    steps: int = 8, rounds: int = 12, clock: str = "thread", warmup: int = 5, capture_path: str = "auto"
) -> dict:
    """Run the comparison; the ratios of `clock` ("thread" or "wall") lead, both are kept."""
    import profiler

    if clock not in CLOCKS:
        raise ValueError(f"unknown clock {clock!r}: expected one of {sorted(CLOCKS)}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = GPT(CONFIG)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        batch = make_batch(CONFIG)

        def step() -> None:
            train_step(model, opt, batch)

        _steps(step, warmup)  # optimizer state, allocator warm-up
        out = Path(tempfile.mkdtemp(prefix="vramscope-bench-cpu-"))
        base: list[tuple[float, float]] = []
        captured: list[list[tuple[float, float]]] = []
        floor: list[tuple[float, float]] = []
        load_at_start = os.getloadavg()[0]
        events = dropped = 0
        paths: set[str] = set()
        rss_start = _rss_bytes()
        for _ in range(rounds):
            base += _steps(step, steps)
            with profiler.profile(out=out, name="overhead-cpu", backend="cpu", capture_path=capture_path) as prof:
                captured.append(_steps(step, steps))
            meta = json.loads((prof.run_dir / "meta.json").read_text())
            events += int(meta["events_seen"])
            dropped += int(meta["events_dropped"])
            paths.add(str(meta.get("capture_path")))
            with _CallOnly():
                floor += _steps(step, steps)
        rss_growth = _rss_bytes() - rss_start
    finally:
        torch.set_num_threads(threads)
    row: dict = {}
    for name, i in (("thread", 0), ("wall", 1)):
        b = [s[i] for s in base]
        ratios = _ratios(b, [[s[i] for s in r] for r in captured])
        ratios["floor_mean_ratio"] = statistics.mean(s[i] for s in floor) / statistics.mean(b)
        row.update({f"{name}_{k}": v for k, v in ratios.items()})
        if name == clock:
            row.update(ratios)
    row.update(
        clock=clock,
        capture_path=sorted(paths),
        load_average_1min_at_start=load_at_start,
        steps_per_round=steps,
        rounds=rounds,
        events_per_captured_step=events / (steps * rounds),
        events_dropped=dropped,
        host_rss_growth_bytes=rss_growth,
    )
    return row


def describe_machine() -> dict:
    return dict(
        device="cpu",
        cpu=platform.processor() or platform.machine(),
        cpu_count=os.cpu_count(),
        torch=torch.__version__,
        python=platform.python_version(),
        intra_op_threads=1,
        load_average_1min=os.getloadavg()[0],  # other jobs on a shared machine
        model=(
            f"GPT n_layer={CONFIG.n_layer} n_head={CONFIG.n_head} n_embd={CONFIG.n_embd} "
            f"vocab={CONFIG.vocab_size} batch {CONFIG.batch_size}x{CONFIG.seq_len}, AdamW"
        ),
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8, help="steps per round and variant")
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--clock", choices=sorted(CLOCKS), default="thread", help="the clock of the headline ratios")
    ap.add_argument(
        "--capture-path",
        choices=("auto", "native", "python"),
        default="auto",
        help="the CPU capture path: the native tracker (auto, native) or the dispatch mode (python)",
    )
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args(argv)
    if args.steps < 2 or args.rounds < 1:
        print("bench/overhead_cpu.py: --steps must be at least 2 and --rounds at least 1", file=sys.stderr)
        return 2
    row = cpu_rows(args.steps, args.rounds, args.clock, capture_path=args.capture_path)
    row = dict(describe_machine(), **row)
    print(f"{row['model']}, torch {row['torch']}, {row['cpu_count']} CPUs, 1 intra-op thread")
    print(f"capture path {', '.join(row['capture_path'])}, load average {row['load_average_1min']:.2f}")
    print(f"{'clock':8s} {'base ms':>8s} {'median':>8s} {'mean':>8s} {'worst':>8s} {'first':>8s} {'floor':>8s}")
    for c in ("thread", "wall"):
        keys = ("median_ratio", "mean_ratio", "worst_step_ratio", "first_step_ratio", "floor_mean_ratio")
        ratios = " ".join(f"{row[f'{c}_{k}']:7.3f}x" for k in keys)
        print(f"{c:8s} {row[f'{c}_base_ms_median']:8.2f} {ratios}")
    print(
        f"events per step {row['events_per_captured_step']:.0f}, dropped {row['events_dropped']}, "
        f"host RSS growth {row['host_rss_growth_bytes'] / 2**20:.1f} MiB"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(row, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
