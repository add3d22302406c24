"""What each part of a capture costs in decode loops, where per-event costs dominate.

    python bench/decode_costs.py [--json bench/results/decode_costs.json] [--tokens 256] [--rounds 2]
                                 [--profile-dir DIR]

For the concat-cache decode and the generate() rows of bench/overhead.py, each variant of
the capture (full; no stacks; no module hooks; neither; no periodic hooked steps) runs
against no capture, all of them in each round in a rotating order (a shared machine's
drift hits them alike), and gives its median, mean and worst-step ratios. One captured
round of each row then runs under cProfile: the capture's heaviest Python functions, per
call and in all. The native tracker's own cost, paid inside the allocator's calls, is
measured apart: nanoseconds per allocator event from a loop of small allocations made at
a shallow and at a deep Python stack.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import overhead_rows as rows  # noqa: E402
from bench.overhead import ratios  # noqa: E402

VARIANTS = {
    "full": {},
    "no_stacks": {"stacks": False},
    "no_modules": {"modules": False},
    "no_stacks_no_modules": {"stacks": False, "modules": False},
    "no_periodic_hooks": {"hooked_steps": (3, 0)},
}


def round_function(row: str, tokens: int):
    """The row's own round (one callable taking the profiler or None), its model built and warm."""
    if row == "generate":
        return rows.generate_round(tokens)
    return rows.decode_round(row.removeprefix("decode_"), tokens)


def variants_round_robin(run_round, rounds: int, names: list[str]) -> dict:
    """Each round runs no capture and every variant once, in a rotating order; one untimed
    captured round per variant first."""
    out = rows.trace_dir()
    for name in names:
        with rows._capture(out, f"warm-{name}", "auto", VARIANTS[name]) as prof:
            run_round(prof)
    order = ["plain", *names]
    times: dict[str, list] = {name: [] for name in order}
    for r in range(rounds):
        for name in order[r % len(order) :] + order[: r % len(order)]:
            if name == "plain":
                times[name].append(run_round(None))
                continue
            with rows._capture(out, name, "auto", VARIANTS[name]) as prof:
                times[name].append(run_round(prof))
    return {name: ratios(times["plain"], times[name]) for name in names}


def event_cost(iterations: int = 20000) -> dict:
    """Nanoseconds per allocator event that the native tracker adds, from a loop of small
    allocations (an alloc, a free_requested and a free_completed each) made at a shallow and
    at a deep Python stack: without a capture, with one without stacks, with one with stacks."""

    def allocate(n):
        for _ in range(n):
            torch.empty(256, device="cuda")

    def at_depth(d, n):
        return allocate(n) if d == 0 else at_depth(d - 1, n)

    def per_iteration_ns(depth) -> float:
        best = float("inf")
        for _ in range(3):
            t = time.perf_counter()
            at_depth(depth, iterations)
            best = min(best, time.perf_counter() - t)
        return best / iterations * 1e9

    out = rows.trace_dir()
    got: dict = {}
    for depth in (2, 40):
        plain = per_iteration_ns(depth)
        with rows._capture(out, "events", "auto", dict(stacks=False, modules=False)):
            no_stacks = per_iteration_ns(depth)
        with rows._capture(out, "events", "auto", dict(modules=False)) as prof:
            stacks = per_iteration_ns(depth)
        got[f"depth_{depth}"] = dict(
            plain_ns_per_iteration=plain,
            tracker_ns_per_event=(no_stacks - plain) / 3,
            tracker_with_stacks_ns_per_event=(stacks - plain) / 3,
        )
    got["capture_path"] = rows._run_facts(prof)["capture_path"]
    return got


def profiled_round(row: str, tokens: int, profile_path: Path | None) -> dict:
    """One captured round under cProfile (after an untimed one): the capture's heaviest functions."""
    run_round = round_function(row, tokens)
    out = rows.trace_dir()
    with rows._capture(out, "warm", "auto") as prof:
        run_round(prof)
    captured: dict = {"stats": cProfile.Profile()}
    with rows._capture(out, "profiled", "auto") as prof:
        captured["stats"].enable()
        t0 = time.perf_counter()
        captured["times"] = run_round(prof)
        captured["seconds"] = time.perf_counter() - t0
        captured["stats"].disable()
    captured["meta"] = json.loads((Path(prof.run_dir) / "meta.json").read_text())
    stats = pstats.Stats(captured["stats"])
    if profile_path is not None:
        stats.dump_stats(str(profile_path))
    meta = captured["meta"]
    steps = max(1, int(meta.get("steps_completed") or len(captured["times"])))
    heavy = []
    for (file, line, fn), (_cc, calls, tottime, cumtime, _callers) in stats.stats.items():
        if "/profiler/" in file or "/workloads/" in file:
            heavy.append(
                dict(
                    function=f"{Path(file).parent.name}/{Path(file).name}:{line} {fn}",
                    calls=calls,
                    own_ms=tottime * 1e3,
                    total_ms=cumtime * 1e3,
                    total_us_per_token=cumtime * 1e6 / len(captured["times"]),
                )
            )
    heavy.sort(key=lambda h: -h["total_ms"])
    text = io.StringIO()
    pstats.Stats(captured["stats"], stream=text).sort_stats("tottime").print_stats(25)
    return dict(
        seconds=captured["seconds"],
        tokens=len(captured["times"]),
        events_seen=meta.get("events_seen"),
        events_per_step=(meta.get("events_seen") or 0) / steps,
        steps_completed=meta.get("steps_completed"),
        capture_functions=heavy[:40],
        top_by_own_time=text.getvalue()[-6000:],
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default="bench/results/decode_costs.json")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--rows", nargs="+", default=["decode_concat", "generate"])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--profile-dir", default=None, help="where each row's cProfile stats are written")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("decode_costs.py needs a CUDA device", file=sys.stderr)
        return 2
    results: dict = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, rows={})
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    results["event_cost"] = event_cost()
    print("tracker:", json.dumps(results["event_cost"]), flush=True)
    for row in args.rows:
        got = results["rows"][row] = variants_round_robin(round_function(row, args.tokens), args.rounds, args.variants)
        for name, r in got.items():
            print(
                f"{row:14s} {name:22s} median {r['median_ratio']:.3f}x mean {r['mean_ratio']:.3f}x "
                f"worst {r['worst_step_ratio']:.2f}x (uncaptured {r['baseline_worst_step_ratio']:.2f}x, "
                f"baseline {r['baseline_median_ms']:.2f} ms)",
                flush=True,
            )
        path.write_text(json.dumps(results, indent=1, default=str))
        where = Path(args.profile_dir) / f"{row}.pstats" if args.profile_dir else None
        got["profiled"] = prof = profiled_round(row, args.tokens, where)
        print(f"{row}: {prof['events_per_step']:.0f} events per step, {prof['tokens']} tokens", flush=True)
        for h in prof["capture_functions"][:12]:
            print(f"   {h['total_us_per_token']:8.1f} us/token {h['calls']:7d} calls  {h['function']}", flush=True)
        path.write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
