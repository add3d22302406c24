"""What capture costs, for every workload of the capture-cost goals, in one process.

    python bench/overhead.py [--json bench/results/overhead.json] [--steps 50] [--rounds 5]
                             [--tokens 256] [--capture-path auto] [--rows train compiled ...]

Rows (bench/overhead_rows.py): gpt2-small bf16 fused AdamW B8x1024 with full capture,
eager and torch.compile'd; KV decode of gpt2-small at B32 with a preallocated and a
concat cache; transformers' generate() on a Llama-style model, B16, per token; the CPU
backend (bench/overhead_cpu.py, "not run" where that module is absent).

Each row alternates uncaptured and captured rounds (a fresh capture per round, after
one untimed warm captured round), so drift hits both. A round is as long as the stretch
in which a long capture hooks modules once (`hooked_steps` every 50th step; 256 tokens
of a generate() loop), so that its share of hooked steps is no smaller than a long run's. Ratios are captured over
uncaptured: the median step, the mean step (the total time a user feels), and the
worst step over the uncaptured median. The first step of every round is left out of
all three (a capture's start is paid once per run, not per step) and reported alone.
A row that fails records its error and the run goes on; the JSON is rewritten after
every row. Host RSS growth is measured over each row.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import overhead_rows as rows  # noqa: E402

# The compiled row runs last: once dynamo has compiled in a process, the module-call wrapper
# stays (profiler/capture/module_calls.py), and every later row's plain rounds would run it.
ROWS = ("train", "decode_prealloc", "decode_concat", "generate", "compiled", "cpu")
CUDA_ROWS = ROWS[:-1]


def ratios(plain: list[list[float]], captured: list[list[float]]) -> dict:
    """Step-time ratios over rounds of per-step seconds (first step of each round apart)."""
    base = [t for r in plain for t in r[1:]]
    cap = [t for r in captured for t in r[1:]]
    if not base or not cap:
        raise ValueError("rounds need two steps or more")
    med = statistics.median(base)
    return dict(
        median_ratio=statistics.median(cap) / med,
        mean_ratio=statistics.mean(cap) / statistics.mean(base),
        worst_step_ratio=max(cap) / med,
        # The same workload's own stalls (allocator growth, the host): a captured worst step
        # near this one is not the capture's.
        baseline_worst_step_ratio=max(base) / med,
        first_step_ratio=max(r[0] for r in captured) / med,
        baseline_median_ms=med * 1e3,
        baseline_mean_ms=statistics.mean(base) * 1e3,
        captured_median_ms=statistics.median(cap) * 1e3,
        captured_mean_ms=statistics.mean(cap) * 1e3,
        steps_per_round=len(captured[0]),
        rounds=len(captured),
    )


def per_round_mean_ratios(plain: list[list[float]], captured: list[list[float]]) -> list[float]:
    """Each captured round's mean step over the plain round before it (first steps apart): a
    host that slows for a while shows as one round apart from the others."""
    return [statistics.mean(c[1:]) / statistics.mean(p[1:]) for p, c in zip(plain, captured)]


def hooked_split(
    plain: list[list[float]], captured: list[list[float]], runs: list[dict], first_step: int
) -> dict | None:
    """Captured steps split by whether module hooks ran in them (each run's `hooked_steps`, from its
    trace), first steps apart: how many ran hooks, the mean of each kind, and what the hooked ones
    add to the mean step over the unhooked ones. A round's i-th time is step first_step + i (1
    where the prefill's step is not timed). None where a run's hooked steps are unknown."""
    hooked, unhooked = [], []
    for times, run in zip(captured, runs):
        steps = run.get("hooked_steps")
        if steps is None:
            return None
        on = set(steps)
        for i, t in enumerate(times[1:], 1):
            (hooked if first_step + i in on else unhooked).append(t)
    if not unhooked:
        return None
    base = statistics.mean(t for r in plain for t in r[1:])
    rest = statistics.mean(unhooked)
    added = sum(t - rest for t in hooked) / (len(hooked) + len(unhooked))
    return dict(
        hooked_steps=len(hooked),
        unhooked_steps=len(unhooked),
        hooked_mean_ms=statistics.mean(hooked) * 1e3 if hooked else None,
        unhooked_mean_ms=rest * 1e3,
        # of the mean step's ratio, the part that hooked steps add
        hooked_part_of_mean_ratio=added / base,
    )


def run_row(name: str, args) -> dict:
    out = rows.trace_dir()
    try:
        if name == "cpu":
            return rows.cpu(args.steps, args.rounds)
        if not torch.cuda.is_available():
            return dict(status="not run", error="no CUDA device")
        if name in ("train", "compiled"):
            got = rows.train(args.steps, args.rounds, out, args.capture_path, compiled=name == "compiled")
        elif name.startswith("decode_"):
            got = rows.decode(name.removeprefix("decode_"), args.tokens, args.rounds, out, args.capture_path)
        else:
            got = rows.generate(args.tokens, args.rounds, out, args.capture_path)
        plain, captured = got.pop("plain"), got.pop("captured")
        # Every step's time, to find which steps a ratio comes from (hooked steps, drains).
        rounds = dict(plain=plain, captured=captured)
        step_ms = {k: [[round(t * 1e3, 3) for t in r] for r in v] for k, v in rounds.items()}
        first_step = 0 if name in ("train", "compiled") else 1  # decode and generate: the prefill's step
        return dict(
            ratios(plain, captured),
            per_round_mean_ratios=per_round_mean_ratios(plain, captured),
            by_hooks=hooked_split(plain, captured, got.get("runs", []), first_step),
            **got,
            step_ms=step_ms,
        )
    finally:
        shutil.rmtree(out, ignore_errors=True)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def summary(results: dict) -> dict:
    def mean_of(*names):
        got = [results["rows"].get(n, {}).get("mean_ratio") for n in names]
        got = [g for g in got if g is not None]
        return max(got) if got else None

    worst = [r.get("worst_step_ratio") for r in results["rows"].values()]
    worst = [w for w in worst if w is not None]
    compiles = results["rows"].get("compiled", {}).get("compiles")
    paths = {run.get("capture_path") for r in results["rows"].values() for run in r.get("runs", [])}
    return dict(
        train_full_capture_mean_ratio=mean_of("train"),
        train_compiled_mean_ratio=mean_of("compiled"),
        decode_full_capture_mean_ratio=mean_of("decode_prealloc", "decode_concat"),
        generate_mean_ratio=mean_of("generate"),
        worst_step_ratio=max(worst) if worst else None,
        cpu_mean_ratio=results["rows"].get("cpu", {}).get("mean_ratio"),
        compiled_recompiles_without_capture=(compiles or {}).get("plain"),
        compiled_recompiles_with_capture=(compiles or {}).get("captured"),
        capture_path=sorted(p for p in paths if p) or None,
    )


def print_row(name: str, row: dict) -> None:
    if "mean_ratio" in row:
        print(
            f"{name:16s} median {row['median_ratio']:.3f}x  mean {row['mean_ratio']:.3f}x  "
            f"worst step {row['worst_step_ratio']:.2f}x (uncaptured {row.get('baseline_worst_step_ratio', 0):.2f}x)  "
            f"(baseline {row.get('baseline_median_ms', 0):.2f} ms, "
            f"RSS +{row.get('rss_growth_mb', 0):.0f} MB)",
            flush=True,
        )
        if row.get("per_round_mean_ratios"):
            print("                 mean by round: " + ", ".join(f"{r:.3f}x" for r in row["per_round_mean_ratios"]))
        hooks = row.get("by_hooks")
        if hooks:
            steps = hooks["hooked_steps"] + hooks["unhooked_steps"]
            added = hooks["hooked_part_of_mean_ratio"]
            print(f"                 {hooks['hooked_steps']} hooked steps of {steps} add {added:.3f} to the mean ratio")
        gc_time = row.get("garbage_collection")
        if gc_time:
            print(
                "                 garbage collection: "
                + ", ".join(
                    f"{k} {v['seconds'] * 1e3:.0f} ms ({v['collections'][2]} full, longest {v['longest_ms']:.0f} ms)"
                    for k, v in gc_time.items()
                ),
                flush=True,
            )
    else:
        print(f"{name:16s} {row.get('status', 'failed')}: {row.get('error')}", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default="bench/results/overhead.json", help="where the results go")
    ap.add_argument("--steps", type=int, default=50, help="training steps per round")
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds per row")
    ap.add_argument("--tokens", type=int, default=256, help="new tokens per decode or generate round")
    ap.add_argument("--capture-path", default="auto", choices=("auto", "native", "python"))
    ap.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    args = ap.parse_args(argv)
    if min(args.steps, args.rounds, args.tokens) < 2:
        print("--steps, --rounds and --tokens must be at least 2", file=sys.stderr)
        return 2
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    results: dict = dict(
        device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        torch=torch.__version__,
        python=sys.version.split()[0],
        args=vars(args),
        rows={},
    )
    t_all = time.perf_counter()
    for name in args.rows:
        t0, rss0 = time.perf_counter(), rows.rss_mb()
        try:
            row = run_row(name, args)
        except Exception as e:  # one row's failure must not cost the others
            row = dict(status="failed", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()[-4000:])
        row.update(seconds=time.perf_counter() - t0, rss_growth_mb=rows.rss_mb() - rss0)
        results["rows"][name] = row
        results.update(summary(results), seconds=time.perf_counter() - t_all)
        path.write_text(json.dumps(results, indent=1, default=str))
        print_row(name, row)
    print(json.dumps({k: v for k, v in results.items() if k not in ("rows", "args")}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
