"""What the native capture path costs on the training thread, piece by piece (no GPU needed).

    python bench/capture_costs.py [--events 43000] [--repeat 5]

The allocator trace tracker is built without CUDA and fed through record_for_test,
which runs the code the allocator calls (with the GIL released, as inside an op).
`--events` is one drain's worth: about 2,700 events a step, and a drain every
0.5 s, which is 16 steps of 31 ms on an H100. Printed: microseconds per call or
per event, and milliseconds per drain, each the median of `--repeat` tries.

Fresh memory: what touching a page for the first time costs on this machine (a page
fault per 4 KiB; in a VM far more than on bare metal), and how many page faults the
capture still takes per event once it runs steadily (cycles of feed, drain through the
hook sampling, journal write).
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from profiler.capture import native  # noqa: E402

ALLOC, FREE_REQUESTED, FREE_COMPLETED = 0, 1, 2
TAGS = [f"forward|transformer.h.{i}.mlp|" for i in range(12)]


def _median_s(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _feed(tracker, events: int) -> None:
    """events/3 alloc, free_requested, free_completed triples over a few hundred addresses."""
    for i in range(events // 3):
        addr = 0x7F0000000000 + (i % 400) * 4096
        tracker.set_tag(TAGS[i % len(TAGS)])
        tracker.record_for_test(ALLOC, 0, addr, 4096, 7)
        tracker.record_for_test(FREE_REQUESTED, 0, addr, 4096, 7)
        tracker.record_for_test(FREE_COMPLETED, 0, addr, 4096, 7)


def _fake_cuda():
    """Just enough of torch.cuda for NativeCudaBackend.start/drain on a machine without a GPU."""
    stats = {"allocation": {"all": {"allocated": 0}}}
    props = mock.Mock(total_memory=1 << 30)
    props.name = "none"
    return contextlib.ExitStack(), [
        mock.patch.object(torch.cuda, "current_device", lambda: 0),
        mock.patch.object(torch.cuda, "device", lambda d: contextlib.nullcontext()),
        mock.patch.object(torch.cuda, "init", lambda: None),
        mock.patch.object(torch.cuda, "reset_peak_memory_stats", lambda d=None: None),
        mock.patch.object(torch.cuda, "get_device_properties", lambda d: props),
        mock.patch.object(torch._C, "_cuda_memoryStats", lambda i: stats, create=True),
        mock.patch.object(torch._C, "_cuda_memorySnapshot", lambda d=None: {"segments": []}, create=True),
        mock.patch.object(torch._C, "_cuda_setMemoryMetadata", None, create=True),
        mock.patch.object(torch._C, "_cuda_getMemoryMetadata", None, create=True),
    ]


def measure(events: int, repeat: int) -> dict:
    from profiler.capture.native_cuda import NativeCudaBackend
    from profiler.trace.writer import TraceWriter

    tracker, error = native.load(cuda=False)
    if tracker is None:
        raise SystemExit(f"the tracker does not build here: {error}")
    out: dict = {"events_per_drain": events, "reads_frames": bool(tracker.reads_frames)}
    tag = TAGS[3]
    n = 100_000
    out["set_tag_us"] = _median_s(lambda: [tracker.set_tag(tag) for _ in range(n)], repeat) / n * 1e6
    stack, patches = _fake_cuda()
    with stack:
        for p in patches:
            stack.enter_context(p)
        backend = NativeCudaBackend(tracker, stacks=bool(tracker.reads_frames))
        backend.start()
        t = time.perf_counter()
        _feed(tracker, events)
        out["record_us_per_event"] = (time.perf_counter() - t) / events * 1e6  # with a GIL release per call
        t = time.perf_counter()
        cols = backend.drain(step=1)
        out["backend_drain_ms"] = (time.perf_counter() - t) * 1e3  # swap, numpy copy, Arrow columns
        _feed(tracker, events)  # the backend has taken the new frames: the tracker's drain alone now
        out["tracker_drain_ms"] = _median_s(tracker.drain, 1) * 1e3  # the C++ swap and numpy copy
        with tempfile.TemporaryDirectory() as tmp:
            writer = TraceWriter(tmp, "costs", {})

            def append_and_flush():
                writer.append("events", cols)
                writer.flush()

            out["writer_append_flush_ms"] = _median_s(append_and_flush, repeat) * 1e3
        backend.stop()
    out["drain_total_ms"] = out["backend_drain_ms"] + out["writer_append_flush_ms"]
    return out


def first_touch_us_per_page(megabytes: int = 64) -> float:
    """Microseconds to touch each 4 KiB page of fresh memory once."""
    import numpy as np

    t = time.perf_counter()
    block = np.empty(megabytes << 20, np.uint8)
    block[::4096] = 1
    return (time.perf_counter() - t) / ((megabytes << 20) / 4096) * 1e6


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def steady_faults(events: int, cycles: int = 6) -> dict:
    """Page faults per event over feed/drain/journal cycles, the first two (warm-up) left out."""
    from profiler.capture.feed import TraceFeed
    from profiler.capture.native_cuda import NativeCudaBackend
    from profiler.capture.options import CaptureOptions
    from profiler.capture.sampling import HookSampling
    from profiler.trace.writer import TraceWriter

    tracker, _ = native.load(cuda=False)
    stack, patches = _fake_cuda()
    got = {"feed": 0, "drain": 0}
    with stack, tempfile.TemporaryDirectory() as tmp:
        for p in patches:
            stack.enter_context(p)
        backend = NativeCudaBackend(tracker, stacks=bool(tracker.reads_frames))
        backend.start()
        feed = TraceFeed(backend, TraceWriter(tmp, "faults", {}))
        sampling = HookSampling(CaptureOptions(), steps_exact=False)
        for cycle in range(cycles):
            f0 = _minor_faults()
            _feed(tracker, events)
            f1 = _minor_faults()
            sampling.observe(feed.drain(cycle))
            feed.writer.flush()
            if cycle >= 2:
                got["feed"] += f1 - f0
                got["drain"] += _minor_faults() - f1
        backend.stop()
    counted = events * (cycles - 2)
    return {f"{k}_faults_per_1000_events": v * 1000 / counted for k, v in got.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--events", type=int, default=43_000)
    p.add_argument("--repeat", type=int, default=5)
    a = p.parse_args(argv)
    if a.events <= 0 or a.repeat <= 0:
        print("--events and --repeat must be positive", file=sys.stderr)
        return 2
    got = measure(a.events, a.repeat)
    got["first_touch_us_per_page"] = first_touch_us_per_page()
    got.update(steady_faults(a.events))
    for k, v in got.items():
        print(f"{k:26s} {v:.3f}" if isinstance(v, float) else f"{k:26s} {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
