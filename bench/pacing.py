"""Which step ends drain, for a loop of given step time and drain cost: DrainPacing run on a clock.

    python bench/pacing.py [--step-ms 3.4] [--fixed-ms 1.5] [--per-step-us 18] [--tokens 256 20000]
                           [--interval-s 0.5] [--first-ms 5] [--json PATH]

profiler/capture/feed.py's DrainPacing and the session's timer rule, driven by a clock that
moves by --step-ms a step, and by a drain's cost when one runs: --fixed-ms plus --per-step-us
for each step it covers (the first step end's drain costs --first-ms: it names the capture's
stacks). The timer drains --interval-s after the last timed drain (Profiler._boundary). No model
and no capture run: this is the schedule
that the pacing's own rules make for those costs, and what it costs a token, for comparing two
commits' pacing on the same cost model. The costs to feed it come from in-place clocks:
`bench/drain_costs.py` fits a drain's fixed and per-event parts, `bench/step_costs.py` and
`bench/token_costs.py` give the step times and events a step.

Printed and written, per run length: drains, paced and timed, the steps each covered (the
first ten and the last), drain time a token, and the largest drain as a share of a step.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from profiler.capture.feed import DrainPacing  # noqa: E402


def schedule(step_s: float, fixed_s: float, per_step_s: float, tokens: int, interval_s: float, first_s: float) -> dict:
    now = [0.0]
    pacing = DrainPacing(clock=lambda: now[0])
    last_full = 0.0
    drains: list[tuple[int, int, float, bool]] = []  # (step, steps covered, seconds, timed)
    for step in range(tokens):
        now[0] += step_s
        paced = pacing.step_ended()
        timed = now[0] - last_full > interval_s
        if not (paced or timed):
            continue
        covered = pacing.steps
        seconds = first_s if step == 0 else fixed_s + per_step_s * covered
        now[0] += seconds
        pacing.drained(seconds)
        drains.append((step, covered, seconds, timed))
        if timed:
            last_full = now[0]
    later = [d for d in drains if d[0] > 0]
    return dict(
        tokens=tokens,
        drains=len(drains),
        timed=sum(d[3] for d in drains),
        covered_first=[d[1] for d in drains[:10]],
        covered_last=drains[-1][1] if drains else 0,
        drain_us_a_token=sum(d[2] for d in drains) / tokens * 1e6,
        largest_drain_share_of_a_step=max((d[2] for d in later), default=0.0) / step_s,
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--step-ms", type=float, default=3.4)
    ap.add_argument("--fixed-ms", type=float, default=1.5, help="a drain's fixed part")
    ap.add_argument("--per-step-us", type=float, default=18.0, help="a drain's part for each step it covers")
    ap.add_argument("--tokens", type=int, nargs="+", default=[256, 20000], help="run lengths, in steps")
    ap.add_argument("--interval-s", type=float, default=0.5, help="the timer's interval (drain_interval_s)")
    ap.add_argument("--first-ms", type=float, default=5.0, help="the first step end's drain")
    ap.add_argument("--json", help="where the results go")
    try:
        args = ap.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    numbers = (args.step_ms, args.fixed_ms, args.per_step_us, args.interval_s, args.first_ms)
    if min(numbers) < 0 or args.step_ms <= 0 or args.interval_s <= 0 or min(args.tokens) < 1:
        print("pacing.py: times must be at least 0 (the step and the interval above 0), tokens at least 1")
        return 2
    costs = dict(step_ms=args.step_ms, fixed_ms=args.fixed_ms, per_step_us=args.per_step_us)
    runs = [
        schedule(
            args.step_ms / 1e3, args.fixed_ms / 1e3, args.per_step_us / 1e6, n, args.interval_s, args.first_ms / 1e3
        )
        for n in args.tokens
    ]
    for run in runs:
        print(
            f"{run['tokens']} steps of {args.step_ms} ms, drains of {args.fixed_ms} ms + {args.per_step_us} us a step: "
            f"{run['drains']} drains ({run['timed']} timed), {run['drain_us_a_token']:.1f} us a token, largest "
            f"{run['largest_drain_share_of_a_step']:.2f} of a step; steps covered {run['covered_first']} ... "
            f"{run['covered_last']}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(dict(costs=costs, interval_s=args.interval_s, runs=runs), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
