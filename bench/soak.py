"""Host memory of a capture left on: one capture over a long training loop.

    python bench/soak.py [--seconds 1800] [--json bench/results/soak.json] [--device cuda]

gpt2-small, bf16 autocast, fused AdamW, B8x1024 (the train row of bench/overhead.py) on
CUDA; a small GPT on the CPU (`--device cpu`). `--workload decode`: transformers'
generate() instead, 64 new tokens a call, every token a step (the generate row of
bench/overhead.py on CUDA; on the CPU bench/drain_costs.py's model, under a backend that
marks steps and drains as the CUDA one does, so that a step a token makes a marker a token).
A "step" below is then one generate() call. One `profiler.profile()` runs for
`--seconds`; the process's resident set (VmRSS) is sampled every `--every` seconds.
Reported: RSS growth over the capture and after its warm-up (the first minute, or the
first quarter of a shorter run: the tracker's interning tables and the first steps'
hooks fill then), the growth rate over the second half in MB per minute, that rate
times 30 minutes, and step times (median, mean, worst step over the median, first step
left out). Every sample is taken while the capture runs; the RSS after it ended is
given apart (finalizing reads the journals into memory once, to write Parquet). The trace is written to a temporary
directory and removed, unless `--keep`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import profiler  # noqa: E402
from bench.overhead_rows import rss_mb  # noqa: E402
from workloads.model import preset  # noqa: E402
from workloads.train import build, make_batch, train_step  # noqa: E402


def slope_mb_per_min(samples: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, MB) samples, in MB per minute."""
    if len(samples) < 2:
        return 0.0
    ts = [t for t, _ in samples]
    ms = [m for _, m in samples]
    t_mean, m_mean = statistics.mean(ts), statistics.mean(ms)
    var = sum((t - t_mean) ** 2 for t in ts)
    if var == 0:
        return 0.0
    return sum((t - t_mean) * (m - m_mean) for t, m in samples) / var * 60


def train_step_of(cuda: bool, device: str):
    """(one training step, its name), warm."""
    cfg = preset("gpt2-small") if cuda else preset("tiny")
    torch.manual_seed(0)
    model, opt = build(cfg, device=device, fused=True if cuda else None)
    batch = make_batch(cfg, device=device)
    dtype = torch.bfloat16 if cuda else None
    for _ in range(3):  # kernels, optimizer state
        train_step(model, opt, batch, autocast_dtype=dtype).item()
    name = "gpt2-small bf16 fused AdamW B8x1024" if cuda else "tiny GPT, AdamW"
    return (lambda: train_step(model, opt, batch, autocast_dtype=dtype).item()), name


def decode_step(cuda: bool, device: str):
    """(one generate() call of 64 tokens, its name), warm; on the CPU, captures get a backend
    that marks steps as the CUDA one does."""
    from bench.drain_costs import cuda_like_backend
    from bench.overhead_rows import CPU_SHAPE, generate_round
    from profiler.capture import session

    if cuda:
        one_call = generate_round(64)
        return (lambda: one_call(None)), "generate() B16, a Llama the size of gpt2-small, bf16"
    torch.set_num_threads(1)
    session.make_backend = cuda_like_backend()
    one_call = generate_round(64, device="cpu", shape=CPU_SHAPE, batch=4)
    return (lambda: one_call(None)), "generate() B4, 12-layer Llama of width 64, CUDA-like capture"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=1800, help="how long the capture stays on")
    ap.add_argument("--every", type=float, default=5, help="seconds between RSS samples")
    ap.add_argument("--json", default="bench/results/soak.json")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cuda", "cpu"))
    ap.add_argument("--keep", action="store_true", help="keep the trace")
    ap.add_argument("--workload", default="train", choices=("train", "decode"))
    args = ap.parse_args(argv)
    if args.seconds <= 0 or args.every <= 0:
        print("--seconds and --every must be positive", file=sys.stderr)
        return 2
    cuda = args.device == "cuda"
    step, workload = (decode_step if args.workload == "decode" else train_step_of)(cuda, args.device)
    out = Path(tempfile.mkdtemp(prefix="vramscope-soak-"))
    rss0 = rss_mb()
    samples: list[tuple[float, float]] = []
    steps: list[float] = []
    t_start = time.perf_counter()
    next_sample = 0.0
    with profiler.profile(out=str(out), name="soak") as prof:
        while (now := time.perf_counter() - t_start) < args.seconds:
            if now >= next_sample:
                samples.append((now, rss_mb()))
                next_sample += args.every
            t = time.perf_counter()
            step()
            steps.append(time.perf_counter() - t)
        samples.append((time.perf_counter() - t_start, rss_mb()))
    rss_after_finalize = rss_mb()
    meta = json.loads((Path(prof.run_dir) / "meta.json").read_text())
    warm = min(60.0, args.seconds / 4)
    after_warmup = [m for t, m in samples if t >= warm] or [samples[-1][1]]
    second_half = [(t, m) for t, m in samples if t >= args.seconds / 2]
    rate = slope_mb_per_min(second_half)
    timed = steps[1:] or steps
    med = statistics.median(timed)
    result = dict(
        device=torch.cuda.get_device_name() if cuda else "cpu",
        torch=torch.__version__,
        python=sys.version.split()[0],
        workload=workload,
        profiler_steps=meta.get("steps_completed"),
        seconds=samples[-1][0],
        steps=len(steps),
        rss_before_capture_mb=rss0,
        rss_growth_mb=samples[-1][1] - rss0,
        warmup_seconds=warm,
        rss_growth_after_warmup_mb=samples[-1][1] - after_warmup[0],
        rss_rate_second_half_mb_per_min=rate,
        rss_30_min_at_that_rate_mb=rate * 30,
        rss_after_finalize_mb=rss_after_finalize,
        step_median_ms=med * 1e3,
        step_mean_ms=statistics.mean(timed) * 1e3,
        worst_step_over_median=max(timed) / med,
        steps_over_2x_median=sum(t > 2 * med for t in timed),
        events_seen=meta.get("event_count", meta.get("events_seen")),
        events_dropped=meta.get("events_dropped"),
        capture_path=meta.get("capture_path"),
        status=meta.get("status"),
        finalize_error=meta.get("finalize_error"),
        rss_samples=[(round(t, 1), round(m, 1)) for t, m in samples],
    )
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "rss_samples"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
