"""Turn a torch memory snapshot (torch.cuda.memory._dump_snapshot's pickle) into a vramscope trace.

The snapshot's segment map is the state at dump time; the start of the trace is
rebuilt by undoing the recorded history newest first (a wrapped ring buffer
included). A snapshot has no allocator counters: the peaks in meta.json come
from replaying block sizes (max_allocated_source: replay). Phases are unknown;
modules come from the entries' user_metadata only. The pickle is read without
running any code: one that references a class or function is refused.
"""

from __future__ import annotations

import argparse

NAME = "import"
HELP = __doc__.splitlines()[0]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("snapshot", metavar="SNAPSHOT", help="a snapshot pickle (.pickle)")
    parser.add_argument("--out", default="traces", help="folder to write the run into (default: traces)")
    parser.add_argument("--name", default=None, help="run name (default: the file's name)")
    parser.add_argument(
        "--device", type=int, default=None, help="device index to import (default: the one with most trace entries)"
    )


def run(args: argparse.Namespace) -> int:
    from profiler.interop.memviz import import_snapshot

    run_dir, facts = import_snapshot(args.snapshot, out_dir=args.out, name=args.name, device=args.device)
    devices = facts["devices"]
    others = [d for d in devices if d != str(facts["device"])]
    how = "chosen" if args.device is not None else "most trace entries"
    line = f"device {facts['device']} ({how}; {facts['entries']:,} trace entries)"
    if others:
        line += "; other devices not imported: " + ", ".join(
            f"{d} ({devices[d]['entries']:,} entries)" for d in sorted(others, key=int)
        )
    print(f"imported {line}")
    notes = []
    if facts["trace_starts_mid_run"]:
        notes.append(
            "the trace starts mid-run (wrapped ring buffer or history enabled late): "
            "blocks it frees are in the rebuilt start state"
        )
    if facts["estimated_block_sizes"]:
        notes.append(f"{facts['estimated_block_sizes']:,} block size(s) of the start state estimated from requests")
    if facts["rewind_misses"] or facts["forward_replay_misses"]:
        notes.append(
            f"{facts['rewind_misses'] + facts['forward_replay_misses']:,} entries did not fit the rebuilt segment map"
        )
    if facts["start_blocks_outside_segments"]:
        notes.append(f"{facts['start_blocks_outside_segments']:,} start block(s) lie in no known segment")
    for n in notes:
        print(f"note: {n}")
    print(run_dir)
    return 0
