"""Find memory that keeps growing from step to step, by allocation site and module.

What is alive at the end of each completed step is grouped by the user's line that
allocated it (file:line function) and its module. A group that grows at every step end
from its first one on is a leak, with its bytes per step (exact when every step adds the
same) and the step it first appeared at. A cache that fills and stops, optimizer state made
at the first step, and a KV cache filling during decoding are told apart and not flagged.
Exit code 0 either way; --json prints one object.
"""

from __future__ import annotations

import argparse

NAME = "leaks"
HELP = __doc__.splitlines()[0]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", metavar="RUN", help="a run directory (holding meta.json)")
    parser.add_argument("--top", type=int, default=10, metavar="N", help="groups to list per kind (default: 10)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead")


def run(args: argparse.Namespace) -> int:
    import json

    from profiler.analysis.leaks import leaks
    from profiler.errors import UsageError
    from profiler.report_leaks import growth_facts, render_growth
    from profiler.trace.reader import load_trace

    if args.top < 0:
        raise UsageError(f"--top must be 0 or more, got {args.top}")
    facts = growth_facts(leaks(load_trace(args.run)), top=args.top)
    print(json.dumps(facts, indent=1) if args.json else "\n".join(render_growth(facts)))
    return 0
