"""What a decode loop's steps cost under capture, part by part, clocked in place.

    python bench/step_costs.py [--kv prealloc concat] [--tokens 300] [--rounds 2] [--device cpu|cuda] [--json PATH]

overhead.py's decode rows: workloads' KV caches, each token a profiler step after which the
loop records the cache (`profiler.record_kv`) and calls `prof.step()`. With --device cuda,
gpt2-small at B32 after a 128-token prompt under the CUDA capture, a sync a token, as
overhead.py runs it; on the CPU, a 12-layer GPT of width 64 (overhead_rows.CPU_SHAPE) at
batch 4 after a 32-token prompt, one intra-op thread, under a capture whose backend answers
as the CUDA one does (drain_costs.cuda_like_backend). Plain and captured rounds alternate.

Clocked where they run, so that what the model's work between them costs them is in the
figures: each token from one step's end to the next; each `profiler.record_kv` and each
`prof.step()` of the loop; inside the step end, each of its parts (the counters' row, the
phase row, the KV rows and the inference rule, hook sampling, the position marker, the steps
row, pacing, the drain timer, the hooks' decision, the re-tag) and each drain, wherever they
run: the position marker also once a capture (the model's parameters, at its first forward).
A `profiler.category` block re-tags inline, not through the clocked re-tag. A part's clock
counts its own reads (tens of nanoseconds) and its wrapper's call.

Printed and written, per cache kind: the token's median and mean with and without capture,
and per part calls a token, median and mean microseconds a call, microseconds a token.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import profiler  # noqa: E402
from bench import overhead_rows as rows  # noqa: E402
from bench.drain_costs import clock, cuda_like_backend  # noqa: E402

KINDS = ("prealloc", "concat")
RECORD_KV, STEP, TOKEN = "profiler.record_kv", "prof.step()", "token"


# (class, attribute, name) of the step end's parts that are clocked, besides the backend's
# counters' row and position marker (BACKEND_PARTS, on whichever backend class runs).
SHARED_PARTS = (
    ("profiler.capture.session", "Profiler", "_set_phase", "phase row"),
    ("profiler.capture.parts", "CaptureParts", "step_ends", "KV rows, inference rule"),
    ("profiler.capture.sampling", "HookSampling", "step_ended", "hook sampling"),
    ("profiler.capture.feed", "TraceFeed", "buffer_row", "steps row"),
    ("profiler.capture.feed", "DrainPacing", "step_ended", "pacing"),
    ("profiler.capture.feed", "TraceFeed", "due", "drain timer"),
    ("profiler.capture.sampling", "HookSampling", "hooks", "hooks' decision"),
    ("profiler.capture.modules", "ModuleTracer", "retag", "re-tag"),
    ("profiler.capture.session", "Profiler", "_drain", "drain"),
)
BACKEND_PARTS = (("stats_row", "counters' row"), ("position", "position marker"))

SECONDS: dict[str, list[float]] = collections.defaultdict(list)  # part -> seconds of each call
_installed: list[str] = []  # the device the clocks were installed for (once a process)


def install(device: str) -> None:
    """Clock the step end's parts, once a process: on CPU the CUDA-like backend's own."""
    import importlib

    from profiler.capture import session

    if _installed:
        return
    _installed.append(device)
    for module, cls_name, attr, name in SHARED_PARTS:
        clock(SECONDS, getattr(importlib.import_module(module), cls_name), attr, name)
    if device == "cuda":
        from profiler.capture.native_cuda import NativeCudaBackend

        for attr, name in BACKEND_PARTS:
            clock(SECONDS, NativeCudaBackend, attr, name)
        return
    torch.set_num_threads(1)
    make = cuda_like_backend()

    def make_clocked(*args, **kwargs):
        backend = make(*args, **kwargs)
        cls = type(backend)
        if "_step_clocks" not in cls.__dict__:  # one class for every backend `make` gives
            cls._step_clocks = True
            for attr, name in BACKEND_PARTS:
                clock(SECONDS, cls, attr, name)
        return backend

    session.make_backend = make_clocked


def decode_round(kv: str, tokens: int, device: str):
    """A round function (the profiler or None) -> token seconds, clocking record_kv and step."""
    from workloads.infer import (
        InferConfig,
        build_model,
        gpt_forward,
        greedy_decode,
        kv_spec,
        make_prompt,
        sdpa_backends,
        with_kv_path,
    )
    from workloads.kv import make_cache
    from workloads.model import GPT

    if device == "cuda":
        cfg = InferConfig.from_toggles(
            "gpt2-small", {"kv": kv, "batch": 32, "prompt_len": 128}, steps=tokens, device=device
        )
        model, prompt, batch, max_len, dtype = build_model(cfg), make_prompt(cfg), 32, cfg.max_len, cfg.dtype
    else:
        torch.manual_seed(0)
        model, batch, dtype = with_kv_path(GPT(rows.CPU_SHAPE)).eval(), 4, torch.float32
        prompt = torch.randint(rows.CPU_SHAPE.vocab_size, (batch, 32))
        max_len = 32 + tokens + 1
    sync = torch.cuda.synchronize if device == "cuda" else None

    def round_(prof) -> list[float]:
        ends: list[float] = []
        with torch.no_grad(), sdpa_backends(device):
            cache = make_cache(kv, kv_spec(model, device, dtype), batch, max_len=max_len)
            forward = gpt_forward(model, cache)

            def after_step():
                if prof is not None:
                    t0 = time.perf_counter()
                    profiler.record_kv(cache)
                    t1 = time.perf_counter()
                    prof.step()
                    t2 = time.perf_counter()
                    SECONDS[RECORD_KV].append(t1 - t0)
                    SECONDS[STEP].append(t2 - t1)
                ends.append(time.perf_counter())

            greedy_decode(forward, prompt, tokens, recompute=False, after_step=after_step, sync=sync)
        return [b - a for a, b in zip(ends, ends[1:])]

    return round_


def measure(kv: str, tokens: int, rounds: int, device: str = "cpu") -> dict:
    """Plain and captured rounds of one cache kind, with the step end's parts clocked."""
    install(device)
    run_round = decode_round(kv, tokens, device)
    seconds = SECONDS
    out = rows.trace_dir()
    with rows._capture(out, f"step-costs-{kv}-warm", "auto") as prof:
        run_round(prof)
    seconds.clear()
    plain: list[float] = []
    for _ in range(rounds):
        plain += run_round(None)
        with rows._capture(out, f"step-costs-{kv}", "auto") as prof:
            seconds[TOKEN] += run_round(prof)
    steps = len(seconds[STEP]) or 1
    return dict(
        plain_token_ms=dict(median=statistics.median(plain) * 1e3, mean=statistics.mean(plain) * 1e3),
        captured_token_ms=dict(
            median=statistics.median(seconds[TOKEN]) * 1e3, mean=statistics.mean(seconds[TOKEN]) * 1e3
        ),
        steps=steps,
        parts={
            name: dict(
                calls_a_step=len(s) / steps,
                us_a_call_median=float(np.median(s) * 1e6),
                us_a_call_mean=float(np.mean(s) * 1e6),
                us_a_step=float(np.sum(s) / steps * 1e6),
            )
            for name, s in seconds.items()
            if name != TOKEN and s
        },
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kv", nargs="+", choices=KINDS, default=list(KINDS))
    p.add_argument("--tokens", type=int, default=300)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    if a.tokens < 2 or a.rounds < 1:
        print("--tokens must be 2 or more and --rounds 1 or more", file=sys.stderr)
        return 2
    if a.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device here", file=sys.stderr)
        return 2
    got = dict(
        device=torch.cuda.get_device_name() if a.device == "cuda" else "cpu",
        torch=torch.__version__,
        tokens_per_round=a.tokens,
        rounds=a.rounds,
        kinds={},
    )
    for kv in a.kv:
        r = got["kinds"][kv] = measure(kv, a.tokens, a.rounds, a.device)
        plain, cap = r["plain_token_ms"], r["captured_token_ms"]
        print(
            f"{kv}: token plain median {plain['median']:.3f} ms, mean {plain['mean']:.3f}; "
            f"captured median {cap['median']:.3f} ms, mean {cap['mean']:.3f} ({cap['mean'] / plain['mean']:.3f}x)"
        )
        for name, v in r["parts"].items():
            print(
                f"  {name:24s} {v['calls_a_step']:6.2f} a step  median {v['us_a_call_median']:8.1f} us  "
                f"mean {v['us_a_call_mean']:8.1f} us a call  {v['us_a_step']:7.1f} us a step"
            )
    if a.json:
        a.json.write_text(json.dumps(got, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
