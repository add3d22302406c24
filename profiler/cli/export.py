"""Export a run as a torch memory snapshot pickle, for pytorch.org/memory_viz.

Events become the device trace (sizes are requested bytes, as torch records them;
user_metadata is the "phase|module|category" tag), the run's `end` segment map
(or its `start` map when there is no end) becomes `segments`, and the
allocator settings come from meta.json.
"""

from __future__ import annotations

import argparse

NAME = "export"
HELP = __doc__.splitlines()[0]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", metavar="RUN", help="a run directory (holding meta.json)")
    parser.add_argument(
        "--memory-viz",
        metavar="OUT.pickle",
        required=True,
        help="write a snapshot pickle that pytorch.org/memory_viz opens",
    )


def run(args: argparse.Namespace) -> int:
    from profiler.interop.memviz import export_memory_viz

    snap = export_memory_viz(args.run, args.memory_viz)
    n = len(snap["device_traces"][0])
    print(f"wrote {args.memory_viz}: {n:,} trace entries, {len(snap['segments']):,} segments")
    return 0
