"""What a drain costs on the profiled thread in a decode loop, piece by piece (no GPU needed).

    python bench/drain_costs.py [--tokens 128] [--rounds 3] [--json PATH]

transformers' generate() on the CPU (bench/tracker_costs.py's 12-layer Llama of width 64,
batch 4, one intra-op thread) under a capture whose backend answers as the CUDA one does:
the native tracker fed by c10's CPU allocator, steps marked in the stream, drains on the
timer and paced (profiler/capture/feed.py) at step ends. Each drain is timed in place, in
the loop, as a whole and by piece: the backend's columns (and inside them the stacks taken
and the tag column), hook sampling's observe, the small tables' rows, the events' append and
the journals' flush. A drain's seconds are then fitted as fixed + per event (least squares):
where the fixed part dominates, how often drains run matters more than how many events they
take. Printed and written: per piece, microseconds a drain and nanoseconds an event.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import overhead_rows as rows  # noqa: E402

# (module, class, attribute, name): what is timed, where it is defined
PIECES = (
    ("profiler.capture.session", "Profiler", "_drain", "drain"),
    ("profiler.capture.native_cuda", "NativeColumns", "_columns", "columns"),
    ("profiler.capture.native_cuda", "NativeColumns", "_take_stacks", "columns: new stacks"),
    ("profiler.capture.native_cuda", "NativeColumns", "_tag_column", "columns: tag"),
    ("profiler.capture.sampling", "HookSampling", "observe", "hook sampling"),
    ("profiler.capture.feed", "TraceFeed", "push_rows", "small tables' rows"),
    ("profiler.trace.writer", "TraceWriter", "flush", "flush"),
)


def cuda_like_backend():
    """The native CPU backend, made to mark steps and drain on the timer as the CUDA one does."""
    from profiler.capture.native_cpu import NativeCpuBackend, make_native_cpu_backend
    from profiler.trace.finalize.markers import marker_tag

    class CudaLike(NativeCpuBackend):
        positions_need_drain = False
        _marker_id = -1

        def position(self, step: int) -> int:
            self._marker_id += 1
            self.set_tag(marker_tag(self._marker_id, step))
            torch.empty(512, dtype=torch.uint8)
            return -(self._marker_id + 1)

    def make(name, stacks, max_entries, device=None, capture_path="auto"):
        backend, error = make_native_cpu_backend(stacks=stacks)
        if backend is None:
            raise SystemExit(f"the native tracker does not build here: {error}")
        backend.__class__ = CudaLike
        return backend

    return make


def clock(seconds: dict[str, list[float]], cls: type, attr: str, name: str) -> None:
    """Wrap cls.attr (as the class's method resolution finds it) in a clock that appends its
    seconds to seconds[name]."""
    original = getattr(cls, attr)

    def clocked(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            seconds[name].append(time.perf_counter() - t0)

    setattr(cls, attr, clocked)


def timed_pieces(seconds: dict[str, list[float]]) -> None:
    """Wrap each of PIECES in a clock that appends its seconds to seconds[name]."""
    import importlib

    for module, cls_name, attr, name in PIECES:
        clock(seconds, getattr(importlib.import_module(module), cls_name), attr, name)


def measure(tokens: int, rounds: int) -> dict:
    from profiler.capture import feed, session

    torch.set_num_threads(1)
    session.make_backend = cuda_like_backend()
    seconds: dict[str, list[float]] = collections.defaultdict(list)
    events: list[int] = []
    drain = feed.TraceFeed.drain

    def counted(self, *args, **kwargs):
        cols = drain(self, *args, **kwargs)
        events.append(len(cols["ts_us"]) if cols else 0)
        return cols

    feed.TraceFeed.drain = counted  # type: ignore[method-assign]
    timed_pieces(seconds)
    run_round = rows.generate_round(tokens, device="cpu", shape=rows.CPU_SHAPE, batch=4)
    out = rows.trace_dir()
    with rows._capture(out, "warm", "auto"):
        run_round(None)
    seconds.clear()
    events.clear()
    for _ in range(rounds):
        with rows._capture(out, "drains", "auto") as prof:
            run_round(prof)
    n = np.array(events, dtype=float)
    total = np.array(seconds["drain"])
    fixed, per_event = np.linalg.lstsq(np.vstack([np.ones_like(n), n]).T, total, rcond=None)[0]
    all_events = max(n.sum(), 1.0)
    return dict(
        torch=torch.__version__,
        tokens_per_round=tokens,
        rounds=rounds,
        drains=len(events),
        tokens_per_drain=rounds * tokens / max(len(events), 1),
        events_per_drain=float(n.mean()) if len(n) else 0.0,
        fit_fixed_us=fixed * 1e6,
        fit_per_event_ns=per_event * 1e9,
        pieces={
            name: dict(
                calls=len(seconds[name]),
                us_a_drain=sum(seconds[name]) / max(len(events), 1) * 1e6,
                ns_an_event=sum(seconds[name]) / all_events * 1e9,
            )
            for _, _, _, name in PIECES
        },
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    if a.tokens < 2 or a.rounds < 1:
        print("--tokens must be 2 or more and --rounds 1 or more", file=sys.stderr)
        return 2
    got = measure(a.tokens, a.rounds)
    print(
        f"{got['drains']} drains, {got['tokens_per_drain']:.1f} tokens and {got['events_per_drain']:.0f} events each; "
        f"fit: {got['fit_fixed_us']:.0f} us + {got['fit_per_event_ns']:.1f} ns an event"
    )
    for name, piece in got["pieces"].items():
        print(f"  {name:20s} {piece['us_a_drain']:8.1f} us a drain {piece['ns_an_event']:7.1f} ns an event")
    if a.json:
        a.json.write_text(json.dumps(got, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
