"""Show a run's metadata, the rows in each table and where they were read from.

Tables read from journals mean the run is still capturing or was killed
before it could finalize; their last, torn batch (if any) is left out.
"""

from __future__ import annotations

import argparse
import json

from profiler.trace import schema

NAME = "info"
HELP = __doc__.splitlines()[0]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", metavar="RUN", help="a run directory (holding meta.json)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead")


def run(args: argparse.Namespace) -> int:
    from profiler.trace.reader import load_trace  # pandas only for the verbs that read traces

    trace = load_trace(args.run)
    summary = _summary(trace)
    if args.json:
        print(json.dumps(summary, indent=1, sort_keys=True, default=str))
    else:
        print(_format(summary))
    return 0


def _summary(trace) -> dict:
    from profiler.analysis.summary import step_counts
    from profiler.trace.meta import run_status

    steps, tail = step_counts(trace)
    return {
        "path": str(trace.path),
        "status": run_status(trace.meta),  # without a final status: running, died or running?
        "steps": steps,  # completed, as `vramscope report` counts them
        "tail_step": tail,
        "meta": trace.meta,
        "tables": {
            t: {"rows": len(getattr(trace, t)), "source": "journal" if t in trace.from_journal else "parquet"}
            for t in schema.TABLE_NAMES
        },
    }


def _format(summary: dict) -> str:
    meta = summary["meta"]
    width = max(len(k) for k in meta) + 2
    tail = "  (+ a partial step after the last one: its rows and events are kept)" if summary["tail_step"] else ""
    lines = [f"run {summary['path']}  (status: {summary['status']})", f"steps: {summary['steps']:,} completed{tail}"]
    lines += ["", "meta:"]
    lines += [f"  {k:<{width}}{_value(v)}" for k, v in sorted(meta.items())]
    lines += ["", "tables:"]
    for name, t in summary["tables"].items():
        lines.append(f"  {name:<10}{t['rows']:>12,} rows  from {t['source']}")
    return "\n".join(lines)


def _value(v) -> str:
    # Strings as they are; everything else as JSON, so null stays null and dicts stay compact.
    return v if isinstance(v, str) else json.dumps(v, sort_keys=True, default=str)
