"""Print a run's memory summary: the peak, top modules, categories and fragmentation at the peak.

Byte counts are shown in binary units and as exact bytes, so that they can be
checked against torch's own counters. The peak is of allocated bytes, which drop
when a free is requested; "active then" adds the blocks whose free has not yet
completed. --json prints the same facts as one object.

A distributed job's directory (one rank=N partition per rank) gets a table of its
ranks (status, peaks, skew), then the full report of its largest rank.
"""

from __future__ import annotations

import argparse

from profiler import report

NAME = "report"
HELP = __doc__.splitlines()[0]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "run", metavar="RUN", help="a run directory (holding meta.json), or a multi-rank job's directory"
    )
    parser.add_argument("--top", type=_count, default=10, metavar="N", help="how many modules to list (default: 10)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead")


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a count (0 or more), got {text!r}")
    return value


def run(args: argparse.Namespace) -> int:
    facts = report.report_of(args.run, top=args.top)
    print(report.to_json(facts) if args.json else report.render(facts))
    return 0
