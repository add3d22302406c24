"""Turn a torch memory snapshot (torch.cuda.memory._dump_snapshot's pickle) into a vramscope trace.

The snapshot's segment map is the state at dump time; the start of the trace is
rebuilt by undoing the recorded history newest first (a wrapped ring buffer
included). A snapshot has no allocator counters: the peaks in meta.json come
from replaying block sizes (max_allocated_source: replay). Phases are unknown;
modules come from the entries' user_metadata only. The pickle is read without
running any code: one that references a class or function is refused.

--since and --until keep a window of the history: an entry number (120000) or a time
from the first entry (90s, 250ms, 1500us); entries at or after --since and before --until.
A large file shows a progress bar on a terminal.
"""

from __future__ import annotations

import argparse
import contextlib
import sys

NAME = "import"
HELP = __doc__.splitlines()[0]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("snapshot", metavar="SNAPSHOT", help="a snapshot pickle (.pickle)")
    parser.add_argument("--out", default="traces", help="folder to write the run into (default: traces)")
    parser.add_argument("--name", default=None, help="run name (default: the file's name)")
    parser.add_argument(
        "--device", type=int, default=None, help="device index to import (default: the one with most trace entries)"
    )
    parser.add_argument("--since", default=None, metavar="BOUND", help="first entry to import: a number or a time")
    parser.add_argument("--until", default=None, metavar="BOUND", help="import entries before this: a number or a time")


# Below this a file imports in a few seconds: no bar.
PROGRESS_MIN_BYTES = 32 << 20


def run(args: argparse.Namespace) -> int:
    from profiler.interop.memviz import import_snapshot
    from profiler.interop.memviz.load import pickle_size
    from profiler.interop.memviz.window import parse_bound

    since = parse_bound(args.since) if args.since is not None else None
    until = parse_bound(args.until) if args.until is not None else None
    with _progress_bar(pickle_size(args.snapshot)) as progress:
        run_dir, facts = import_snapshot(
            args.snapshot,
            out_dir=args.out,
            name=args.name,
            device=args.device,
            since=since,
            until=until,
            progress=progress,
        )
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
    if facts["window"]:
        w = facts["window"]
        notes.append(f"entries {w['first_entry']:,} to {w['end_entry']:,} of the device's trace (--since/--until)")
    if facts["stacks_truncated"]:
        notes.append(
            f"{facts['stacks_truncated']:,} stack(s) deeper than the import keeps were cut to their innermost frames"
        )
    if facts["reader"] != "streaming" and pickle_size(args.snapshot) >= PROGRESS_MIN_BYTES:
        # The unpickler's objects take several times the file: say why it was not streamed.
        notes.append(f"read by the standard unpickler, not streamed ({facts['reader'].removeprefix('unpickler (')}")
    if facts["start_blocks_outside_segments"]:
        notes.append(f"{facts['start_blocks_outside_segments']:,} start block(s) lie in no known segment")
    for n in notes:
        print(f"note: {n}")
    print(run_dir)
    return 0


@contextlib.contextmanager
def _progress_bar(size: int):
    """A progress callback drawing a bar on stderr for a large file on a terminal, else None."""
    if size < PROGRESS_MIN_BYTES or not sys.stderr.isatty():
        yield None
        return
    try:
        from rich.console import Console
        from rich.progress import Progress
    except ImportError:  # rich comes with the dashboard's extras; the import works without it
        yield None
        return
    with Progress(console=Console(stderr=True), transient=True) as bar:
        tasks: dict = {}  # stage -> the bar's task id

        def update(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.update(tasks[stage], completed=done)

        yield update
