"""Compare two runs: peak, reserved, categories and top modules, each with its delta (b - a).

Then what changed at the peak: the peak allocated bytes of each (step, phase) span of both
runs, aligned by step number and phase name, with the span holding each run's peak marked
(the first step and the peak steps; --all-steps for every one). The numbers are those of the
dashboard's Compare page (profiler.analysis.compare). --json prints one object.
"""

from __future__ import annotations

import argparse

NAME = "diff"
HELP = __doc__.splitlines()[0]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("a", metavar="A", help="the run compared against (a run directory)")
    parser.add_argument("b", metavar="B", help="the other run")
    parser.add_argument("--top", type=int, default=10, metavar="N", help="modules to list (default: 10)")
    parser.add_argument("--all-steps", action="store_true", help="list the spans of every step, not only the peaks'")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead")


def run(args: argparse.Namespace) -> int:
    import json

    from profiler.analysis.compare import diff_runs
    from profiler.errors import UsageError
    from profiler.report_diff import diff_facts, render_diff
    from profiler.trace.reader import load_trace

    if args.top < 0:
        raise UsageError(f"--top must be 0 or more, got {args.top}")
    d = diff_runs(load_trace(args.a), load_trace(args.b))
    facts = diff_facts(d, (str(args.a), str(args.b)), top=args.top)
    print(json.dumps(facts, indent=1) if args.json else "\n".join(render_diff(facts, args.all_steps)))
    return 0
