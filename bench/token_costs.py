"""What the capture's Python costs a decode token, each part clocked in place (no GPU needed).

    python bench/token_costs.py [--tokens 128] [--rounds 6] [--device cpu|cuda] [--json PATH]

transformers' generate() on the CPU (bench/tracker_costs.py's 12-layer Llama of width 64,
batch 4, one intra-op thread) under a capture whose backend answers as the CUDA one does
(bench/drain_costs.py); with --device cuda, overhead.py's generate() row (a Llama the size of
gpt2-small, bf16, B16) under the CUDA capture itself. Clocked where they run, in the loop, so
that what the model's work between them costs them (their code and data pushed out of the
CPU's caches) is in the figures:

- each `Cache.update` call, wrapper and update together, with the wrapper as the capture has
  it in rotation, round by round in one process: `stamp` (the hint set and reset around the
  update: captures without stacks), `mark` (only its cache marked changed: captures with
  stacks, whose kv_cache category finalize reads from the stack), `none` (no wrapper, what
  the update itself costs under capture) and `uncaptured` (no capture: what it costs alone);
- each step end (`Profiler._boundary`) that did not drain, and each drain;
- each measure of the caches at an inference forward's end (`CacheWatch.measure`).

Printed and written: per part and wrapper, microseconds a call and a token.
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
from bench.drain_costs import cuda_like_backend  # noqa: E402

WRAPS = ("stamp", "mark", "none")
UNCAPTURED = "uncaptured"


class Clocks:
    """Seconds per part, for the wrapper in use: seconds[wrap][part] -> list."""

    def __init__(self) -> None:
        self.wrap = "mark"
        self.seconds: dict[str, dict[str, list[float]]] = {}
        self.drains = 0

    def add(self, part: str, seconds: float) -> None:
        self.seconds.setdefault(self.wrap, collections.defaultdict(list))[part].append(seconds)


def clock_updates(clocks: Clocks) -> None:
    """Clock each Cache.update call from outside whatever wraps it now."""
    from transformers.cache_utils import Cache

    inner = Cache.__dict__["update"]

    def update(cache, *args, **kwargs):  # outermost: the wrapper and the update, as the model calls them
        t0 = time.perf_counter()
        try:
            return inner(cache, *args, **kwargs)
        finally:
            clocks.add("Cache.update", time.perf_counter() - t0)

    Cache.update = update


def install(clocks: Clocks) -> None:
    """Clock the parts, and make each capture's cache watch wrap as clocks.wrap says."""

    from profiler.capture import hf_cache, session

    boundary, drain, measure = session.Profiler._boundary, session.Profiler._drain, hf_cache.CacheWatch.measure
    watch_init, watch_install = hf_cache.CacheWatch.__init__, hf_cache.CacheWatch.install

    def timed_drain(self, *args, **kwargs):
        clocks.drains += 1
        t0 = time.perf_counter()
        try:
            return drain(self, *args, **kwargs)
        finally:
            clocks.add("drain", time.perf_counter() - t0)

    def timed_boundary(self, *args, **kwargs):
        drains, t0 = clocks.drains, time.perf_counter()
        try:
            return boundary(self, *args, **kwargs)
        finally:
            if clocks.drains == drains:
                clocks.add("step end (no drain)", time.perf_counter() - t0)

    def timed_measure(self):
        t0 = time.perf_counter()
        try:
            return measure(self)
        finally:
            clocks.add("cache measure", time.perf_counter() - t0)

    def init(self, *args, stamp=True, **kwargs):
        watch_init(self, *args, stamp=clocks.wrap == "stamp", **kwargs)

    def install_watch(self):
        watch_install(self)
        if getattr(self, "clocked", False) or not self.on:  # done, or transformers not imported yet
            return
        self.clocked = True
        if clocks.wrap == "none":
            self.uninstall()
        clock_updates(clocks)

    session.Profiler._drain = timed_drain
    session.Profiler._boundary = timed_boundary
    hf_cache.CacheWatch.measure = timed_measure
    hf_cache.CacheWatch.__init__ = init
    hf_cache.CacheWatch.install = install_watch


def measure(tokens: int, rounds: int, device: str = "cpu") -> dict:
    from transformers.cache_utils import Cache

    from profiler.capture import session

    if device == "cpu":
        torch.set_num_threads(1)
        session.make_backend = cuda_like_backend()
        run_round = rows.generate_round(tokens, device="cpu", shape=rows.CPU_SHAPE, batch=4)
    else:
        run_round = rows.generate_round(tokens)
    original = Cache.__dict__["update"]
    clocks = Clocks()
    install(clocks)
    out = rows.trace_dir()
    with rows._capture(out, "warm", "auto"):
        run_round(None)
    Cache.update = original
    clocks.seconds = {}
    modes = (*WRAPS, UNCAPTURED)
    for r in range(rounds):
        for wrap in modes if r % 2 == 0 else modes[::-1]:
            clocks.wrap = wrap
            if wrap == UNCAPTURED:
                clock_updates(clocks)
                run_round(None)
            else:
                with rows._capture(out, f"token-costs-{wrap}", "auto") as prof:
                    run_round(prof)
            Cache.update = original  # the clock's shim, which the watch leaves in place
    n_tokens = rounds * tokens
    return dict(
        device=torch.cuda.get_device_name() if device == "cuda" else "cpu",
        torch=torch.__version__,
        tokens_per_round=tokens,
        rounds=rounds,
        parts={
            wrap: {
                part: dict(
                    calls=len(s),
                    us_a_call_median=float(np.median(s) * 1e6),
                    us_a_call_mean=float(np.mean(s) * 1e6),
                    us_a_token=float(np.sum(s) / n_tokens * 1e6),
                )
                for part, s in parts.items()
            }
            for wrap, parts in clocks.seconds.items()
        },
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    if a.tokens < 2 or a.rounds < 1:
        print("--tokens must be 2 or more and --rounds 1 or more", file=sys.stderr)
        return 2
    if a.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device here", file=sys.stderr)
        return 2
    got = measure(a.tokens, a.rounds, a.device)
    for wrap, parts in got["parts"].items():
        print(f"Cache.update wrapper: {wrap}" if wrap != UNCAPTURED else "no capture")
        for part, v in sorted(parts.items()):
            print(
                f"  {part:22s} {v['calls'] / (a.rounds * a.tokens):6.2f} calls a token  "
                f"median {v['us_a_call_median']:8.1f} us  mean {v['us_a_call_mean']:8.1f} us a call  "
                f"{v['us_a_token']:7.1f} us a token"
            )
    if a.json:
        a.json.write_text(json.dumps(got, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
