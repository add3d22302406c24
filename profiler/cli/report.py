"""Print a run's memory summary: the peak, top modules, categories and fragmentation at the peak.

Byte counts are shown in binary units and as exact bytes, so that they can be
checked against torch's own counters. The peak is of allocated bytes, which drop
when a free is requested; "active then" adds the blocks whose free has not yet
completed. --json prints the same facts as one object.

A distributed job's directory (one rank=N partition per rank) gets a table of its
ranks (status, peaks, skew), then the full report of its largest rank. A folder of
runs (vramscope run's --out) gets one row per run and job: name, status, peak
allocated, steps, path (--json: a list); with no run in it, a one-line error (exit 2).

Status is complete, oom or error once the capture ended, terminated after SIGTERM or
SIGHUP, capture_failed when the capture stopped on an error of its own (the script ran
on; the report gives the reason and the steps written before); without a final status, a
run is running while its process is alive, died once it is gone (killed or crashed),
and running? when its process is on another host. Steps are those the optimizer (or
profiler.step()) completed; "+ tail" marks the events after the last one.
"""

from __future__ import annotations

import argparse

from profiler import report

NAME = "report"
HELP = __doc__.splitlines()[0]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "run",
        metavar="RUN",
        help="a run directory (holding meta.json), a multi-rank job's directory, or a folder of runs",
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
    from profiler import report_runs

    if report_runs.is_folder_of_runs(args.run):
        rows = report_runs.runs_report(args.run)
        print(report_runs.to_json(rows) if args.json else report_runs.render_runs(rows))
        return 0
    facts = report.report_of(args.run, top=args.top)
    print(report.to_json(facts) if args.json else report.render(facts))
    return 0
