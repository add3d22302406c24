"""Where the native tracker's time goes inside real decode and generate() loops.

    python bench/tracker_costs.py [--json bench/results/tracker_costs.json] [--tokens 256] [--rounds 2]
                                  [--rows generate decode_concat decode_prealloc] [--device cuda|cpu]

The tracker is built with VRAMSCOPE_TIME_PARTS: it then clocks, on the profiled thread, each
allocator event it handles, the Python stack walk inside it and a free's lookup of its
allocation's stack, and counts the frames each walk read and looked up. Each row alternates
a plain round and a captured one; per token it gives the capture's added time and the part
of it spent inside the tracker. What the tracker does not explain is Python (step ends,
drains, hooks) or the allocator's own work around its call. The clocks cost time themselves
(two reads per timed part, `clock_read_ns` each): the tracker's figures here are corrected
for them, the wall times are not.

On the CPU only the generate() row runs, on a 12-layer Llama of width 64 (batch 4).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ["VRAMSCOPE_TIME_PARTS"] = "1"  # before the tracker is built: the timed build

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import profiler  # noqa: E402
from bench import overhead_rows as rows  # noqa: E402
from profiler.capture import native  # noqa: E402


def make_round(row: str, tokens: int, device: str) -> rows.RoundFn:
    if row == "generate":
        if device == "cpu":
            return rows.generate_round(tokens, device="cpu", shape=rows.CPU_SHAPE, batch=4)
        return rows.generate_round(tokens)
    return rows.decode_round(row.removeprefix("decode_"), tokens)


def per_token(parts: dict, tokens: int) -> dict:
    """The tracker's part clocks of one captured round, per token and per event or walk,
    less the clocks' own reads."""
    events, walks, frees = parts["event_calls"], parts["stack_calls"], parts["free_calls"]
    read = parts["clock_read_ns"]
    # Inside an event's window: its closing read, and both reads of each walk and free in it.
    event_ns = parts["event_ns"] - read * (events + 2 * walks + 2 * frees)
    stack_ns = parts["stack_ns"] - read * walks
    free_ns = parts["free_ns"] - read * frees
    return dict(
        events_per_token=events / tokens,
        tracker_us_per_token=event_ns / tokens / 1e3,
        ns_per_event=event_ns / max(events, 1),
        stack_us_per_token=stack_ns / tokens / 1e3,
        ns_per_walk=stack_ns / max(walks, 1),
        walks_per_token=walks / tokens,
        frames_read_per_walk=parts["frames_read"] / max(walks, 1),
        frames_looked_up_per_walk=parts["frames_looked_up"] / max(walks, 1),
        walks_reused_share=parts["walks_reused"] / max(walks, 1),
        free_lookup_us_per_token=free_ns / tokens / 1e3,
        clock_read_ns=read,
    )


def measure(row: str, tokens: int, rounds: int, device: str, tracker) -> dict:
    run_round = make_round(row, tokens, device)
    out = Path(tempfile.mkdtemp(prefix="vramscope-tracker-costs-"))
    with profiler.profile(out=out, name=f"{row}-warm"):  # the tracker's build, the first snapshot
        run_round(None)
    plain: list[float] = []
    captured: list[float] = []
    tracker_rounds = []
    for i in range(rounds):
        plain += run_round(None)
        tracker.part_times()  # from zero
        with profiler.profile(out=out, name=f"{row}-{i}") as prof:
            got = run_round(prof)
        captured += got
        tracker_rounds.append(per_token(tracker.part_times(), len(got)))
    plain_ms, captured_ms = statistics.mean(plain) * 1e3, statistics.mean(captured) * 1e3
    means = {k: statistics.mean(r[k] for r in tracker_rounds) for k in tracker_rounds[0]}
    added_us = (captured_ms - plain_ms) * 1e3
    return dict(
        tokens=len(captured),
        plain_ms=plain_ms,
        captured_ms=captured_ms,
        added_us_per_token=added_us,
        tracker_share_of_added=means["tracker_us_per_token"] / added_us if added_us > 0 else None,
        **means,
        rounds=tracker_rounds,
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default="bench/results/tracker_costs.json", help="where the results go")
    ap.add_argument("--tokens", type=int, default=256, help="new tokens per round")
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds per row")
    ap.add_argument(
        "--rows",
        nargs="+",
        default=["generate", "decode_concat", "decode_prealloc"],
        choices=["generate", "decode_concat", "decode_prealloc"],
    )
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    args = ap.parse_args(argv)
    if min(args.tokens, args.rounds) < 2:
        print("--tokens and --rounds must be at least 2", file=sys.stderr)
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda needs a CUDA device", file=sys.stderr)
        return 2
    tracker, error = native.load(cuda=args.device == "cuda")
    if tracker is None or not hasattr(tracker, "part_times"):
        print(f"the timed tracker did not build: {error}", file=sys.stderr)
        return 2
    row_names = [r for r in args.rows if args.device == "cuda" or r == "generate"]
    result: dict = dict(
        device=torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        torch=torch.__version__,
        args=vars(args),
        rows={},
    )
    t0 = time.perf_counter()
    for row in row_names:
        got = result["rows"][row] = measure(row, args.tokens, args.rounds, args.device, tracker)
        share = got["tracker_share_of_added"]
        print(
            f"{row:16s} plain {got['plain_ms']:.3f} ms, +{got['added_us_per_token']:.0f} us a token captured; "
            f"tracker {got['tracker_us_per_token']:.0f} us ({'n/a' if share is None else f'{share:.0%}'} of it): "
            f"{got['events_per_token']:.0f} events at {got['ns_per_event']:.0f} ns, "
            f"walks {got['stack_us_per_token']:.0f} us ({got['walks_per_token']:.0f} at {got['ns_per_walk']:.0f} ns, "
            f"{got['frames_read_per_walk']:.1f} frames read, {got['frames_looked_up_per_walk']:.1f} looked up, "
            f"{got['walks_reused_share']:.0%} reused), free lookups {got['free_lookup_us_per_token']:.0f} us",
            flush=True,
        )
    result["seconds"] = time.perf_counter() - t0
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
