"""What each part of a capture costs in decode loops, where per-event costs dominate.

    python bench/decode_costs.py [--json bench/results/decode_costs.json] [--tokens 256] [--rounds 2]
                                 [--profile-dir DIR]

For the concat-cache decode and the generate() rows of bench/overhead.py, each variant of
the capture (full; no stacks; no module hooks; neither; no periodic hooked steps) runs in
alternating rounds against no capture, as overhead.py does, and gives its median, mean
and worst-step ratios. One captured round of each row then runs under cProfile: the
Python functions of the capture that take the most time, per call and in all, say
where the part of the cost that Python pays goes (the rest is the native tracker's, paid
inside the allocator's calls).
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


def run_variant(row: str, tokens: int, rounds: int, options: dict) -> dict:
    out = rows.trace_dir()
    if row == "generate":
        got = rows.generate(tokens, rounds, out, "auto", options)
    else:
        got = rows.decode(row.removeprefix("decode_"), tokens, rounds, out, "auto", options)
    r = ratios(got["plain"], got["captured"])
    r["runs"] = got["runs"]
    return r


def profiled_round(row: str, tokens: int, profile_path: Path | None) -> dict:
    """One captured round under cProfile (after the rows' own warm-up): the capture's heaviest functions."""
    captured = {}

    class Recording:
        """Stands in for rows.alternate: runs one warm round, then one profiled captured round."""

        def __call__(self, run_round, rounds, out, name, capture_path, options=None):
            with rows._capture(out, f"{name}-warm", capture_path) as prof:
                run_round(prof)
            prof_py = cProfile.Profile()
            with rows._capture(out, name, capture_path) as prof:
                prof_py.enable()
                t0 = time.perf_counter()
                times = run_round(prof)
                captured["seconds"] = time.perf_counter() - t0
                prof_py.disable()
            captured["meta"] = json.loads((Path(prof.run_dir) / "meta.json").read_text())
            captured["times"] = times
            captured["stats"] = prof_py
            return dict(plain=[times], captured=[times], runs=[])

    real, rows.alternate = rows.alternate, Recording()
    try:
        run_variant(row, tokens, 1, {})
    finally:
        rows.alternate = real
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
    ap.add_argument("--rounds", type=int, default=2)
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
    for row in args.rows:
        got = results["rows"][row] = {}
        for name in args.variants:
            r = run_variant(row, args.tokens, args.rounds, VARIANTS[name])
            got[name] = r
            print(
                f"{row:14s} {name:22s} median {r['median_ratio']:.3f}x mean {r['mean_ratio']:.3f}x "
                f"worst {r['worst_step_ratio']:.2f}x (baseline {r['baseline_median_ms']:.2f} ms)",
                flush=True,
            )
            path.write_text(json.dumps(results, indent=1, default=str))
        where = Path(args.profile_dir) / f"{row}.pstats" if args.profile_dir else None
        got["profiled"] = prof = profiled_round(row, args.tokens, where)
        print(f"{row}: {prof['events_per_step']:.0f} events per step, {prof['tokens']} tokens", flush=True)
        for h in prof["capture_functions"][:15]:
            print(f"   {h['total_us_per_token']:8.1f} us/token {h['calls']:7d} calls  {h['function']}", flush=True)
        path.write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
