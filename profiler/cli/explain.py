"""Explain why reserved memory exceeds allocated memory, at the peak of reserved bytes.

reserved - allocated is cut into its causes, each in exact bytes, adding up to the gap:
blocks pending free on another stream, inactive splits (free holes inside segments that
hold live blocks, each put down to the module and line whose free left it), segments kept
but wholly free, and free bytes in private pools where the trace records pools. Inside
allocated bytes, the rounding of requests up to block sizes is counted too. Then what to
try (expandable_segments, max_split_size_mb, fixed-length buckets, empty_cache), each with
the bytes the trace measures for it. --step N explains the end of step N instead.
CPU runs have no allocator segments: the answer is n/a.
"""

from __future__ import annotations

import argparse

NAME = "explain"
HELP = __doc__.splitlines()[0]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", metavar="RUN", help="a run directory (holding meta.json)")
    parser.add_argument("--step", type=int, default=None, metavar="N", help="explain the end of step N instead")
    parser.add_argument("--top", type=int, default=8, metavar="N", help="hole sources to list (default: 8)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead")


def run(args: argparse.Namespace) -> int:
    import json

    from profiler.analysis.explain import explain
    from profiler.analysis.live import lifetimes
    from profiler.errors import UsageError
    from profiler.report_explain import explanation_facts, render_explanation
    from profiler.trace.reader import load_trace

    if args.top < 0:
        raise UsageError(f"--top must be 0 or more, got {args.top}")
    trace = load_trace(args.run)
    lt = lifetimes(trace)
    event_index = None if args.step is None else _end_of_step(trace, lt, args.step)
    facts = explanation_facts(explain(trace, lt, event_index), top=args.top)
    print(json.dumps(facts, indent=1) if args.json else "\n".join(render_explanation(facts)))
    return 0


def _end_of_step(trace, lt, step: int) -> int:
    from profiler.analysis.timeline import step_spans
    from profiler.errors import UsageError

    spans = step_spans(trace, lt)
    row = spans[spans["step"] == step]
    if row.empty:
        have = spans["step"].tolist()
        raise UsageError(f"step {step} is not in this run (steps {have[0]}..{have[-1]})" if have else "no steps")
    return int(row["event_index_end"].iloc[0])
