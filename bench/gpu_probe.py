"""One-process probe of the two CUDA capture paths (torch's history vs the native tracker).

    OUT=/some/dir python bench/gpu_probe.py        # env: PROBE_ROUNDS (3), PROBE_STEPS (20)

Builds the tracker, then on gpt2-small (bf16 autocast, fused AdamW, B8x1024), eager and
torch.compile'd: step times with no capture / python path / native path in
alternating rounds; exactness of each path (replayed peak vs max_memory_allocated,
alloc and free events vs the allocator's counters); shares of the bytes alive at the
peak that carry a stack and a module, per phase; dynamo recompiles with and without
capture; the segment map replayed from the event stream at the end against the allocator's
snapshot (addresses, sizes, allocated bytes). Every section is wrapped: a failure prints
its traceback and the probe goes on.
Results: $OUT/gpu_probe.json.
"""

from __future__ import annotations

import contextlib
import gc
import glob
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import profiler  # noqa: E402
from workloads.model import preset  # noqa: E402
from workloads.train import build, make_batch, train_step  # noqa: E402

ROUNDS = int(os.environ.get("PROBE_ROUNDS", 3))
STEPS = int(os.environ.get("PROBE_STEPS", 20))
OUT = Path(os.environ.get("OUT") or tempfile.mkdtemp(prefix="probe-out-"))
TRACES = Path(tempfile.mkdtemp(prefix="probe-traces-"))
PATHS = ("python", "native")
results: dict = {}


def section(name):
    def wrap(fn):
        def run(*a, **k):
            t0 = time.perf_counter()
            print(f"\n=== {name}", flush=True)
            try:
                results[name] = fn(*a, **k)
            except Exception:
                tb = traceback.format_exc()
                print(tb, flush=True)
                results[name] = {"error": tb}
            results.setdefault("section_seconds", {})[name] = round(time.perf_counter() - t0, 2)
            save()
            return results[name]

        return run

    return wrap


def save():
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "gpu_probe.json").write_text(json.dumps(results, indent=1, default=str))


def fresh():
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


def capture(path: str | None, name: str):
    if path is None:
        return contextlib.nullcontext()
    return profiler.profile(out=TRACES, name=f"{name}-{path}", capture_path=path)


def timed(step, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        step()
        out.append(time.perf_counter() - t)
    return out


def ratios(times: dict[str, list[list[float]]]) -> dict:
    """median/mean/worst of each variant against no capture; worst leaves out each round's first step."""
    flat = {k: [t for r in v for t in r] for k, v in times.items()}
    later = {k: [t for r in v for t in r[1:]] for k, v in times.items()}
    b = flat["none"]
    out = {"baseline_median_ms": statistics.median(b) * 1e3, "baseline_mean_ms": statistics.mean(b) * 1e3}
    for k in times:
        if k == "none":
            continue
        out[k] = dict(
            median_ratio=statistics.median(flat[k]) / statistics.median(b),
            mean_ratio=statistics.mean(flat[k]) / statistics.mean(b),
            worst_step_ratio=max(later[k]) / statistics.median(b),
            worst_ms=max(later[k]) * 1e3,
        )
        print(
            f"  {k:8s} median {out[k]['median_ratio']:.3f}x  mean {out[k]['mean_ratio']:.3f}x  "
            f"worst {out[k]['worst_step_ratio']:.2f}x (baseline median {out['baseline_median_ms']:.2f} ms)",
            flush=True,
        )
    return out


def alternate(step, name: str) -> tuple[dict, dict]:
    times: dict[str, list[list[float]]] = {"none": [], **{p: [] for p in PATHS}}
    metas: dict[str, list] = {p: [] for p in PATHS}
    for _ in range(ROUNDS):
        for variant in ("none", *PATHS):
            path = None if variant == "none" else variant
            with capture(path, name) as prof:
                times[variant].append(timed(step, STEPS))
            if prof is not None:
                meta = json.loads((prof.run_dir / "meta.json").read_text())
                metas[variant].append(
                    {k: meta.get(k) for k in ("capture_path", "capture_path_error", "capture_host_s")}
                )
    return times, metas


def stats_counts() -> tuple[int, int]:
    s = torch.cuda.memory_stats()
    return int(s.get("allocation.all.allocated", 0)), int(s.get("allocation.all.freed", 0))


def exactness(run_dir: Path, torch_peak: int, allocs: int, frees: int) -> dict:
    """The trace against the allocator: replayed peak, and alloc/free events against its counters."""
    from profiler.analysis.live import alive_at_peak
    from profiler.trace.reader import load_trace

    trace = load_trace(run_dir)
    meta = json.loads((run_dir / "meta.json").read_text())
    ev = trace.events
    action = ev["action"].astype(str).to_numpy()
    block = ev["block_bytes"].fillna(0).to_numpy(np.int64)
    delta = np.where(action == "alloc", block, np.where(action == "free_requested", -block, 0))
    replay_peak = int(meta["baseline_allocated_bytes"] + max(0, int(np.cumsum(delta).max()) if len(delta) else 0))
    out = dict(
        capture_path=meta.get("capture_path"),
        capture_path_error=meta.get("capture_path_error"),
        events=len(ev),
        replay_peak=replay_peak,
        torch_max_memory_allocated=torch_peak,
        peak_exact=replay_peak == torch_peak,
        alloc_events=int((action == "alloc").sum()),
        allocator_allocs=allocs,
        free_requested_events=int((action == "free_requested").sum()),
        free_completed_events=int((action == "free_completed").sum()),
        allocator_frees=frees,  # the allocator counts a free in free(), where free_requested is recorded
        events_dropped=meta.get("events_dropped"),
        block_replay_misses=meta.get("block_replay_misses"),
        capture_host_s=meta.get("capture_host_s"),
    )
    out["counts_exact"] = out["alloc_events"] == allocs and out["free_requested_events"] == frees
    out["segments_at_end"] = segments_at_end(trace)
    live = alive_at_peak(trace)
    total = float(live["size_bytes"].sum()) or 1.0
    shares = {}
    for phase, g in live.groupby(live["phase"].astype(object).fillna("(none)")):
        shares[str(phase)] = dict(
            bytes=int(g["size_bytes"].sum()),
            share_of_peak=float(g["size_bytes"].sum()) / total,
            with_stack=float(g["size_bytes"][g["stack_id"].notna()].sum()) / max(1.0, float(g["size_bytes"].sum())),
            with_module=float(g["size_bytes"][g["module"].notna()].sum()) / max(1.0, float(g["size_bytes"].sum())),
        )
    out["at_peak"] = dict(
        with_stack=float(live["size_bytes"][live["stack_id"].notna()].sum()) / total,
        with_module=float(live["size_bytes"][live["module"].notna()].sum()) / total,
        by_phase=shares,
    )
    print(
        f"  {out['capture_path']}: peak {replay_peak} vs {torch_peak} exact={out['peak_exact']}; "
        f"allocs {out['alloc_events']}/{allocs} frees {out['free_requested_events']}/{frees} "
        f"dropped {out['events_dropped']}; at peak: stack {out['at_peak']['with_stack']:.3f} "
        f"module {out['at_peak']['with_module']:.3f}",
        flush=True,
    )
    for phase, s in shares.items():
        print(
            f"    {phase:12s} {s['share_of_peak']:.3f} of peak: "
            f"stack {s['with_stack']:.3f} module {s['with_module']:.3f}"
        )
    return out


def _per_segment(addr, seg_bytes, block_bytes, state) -> dict:
    """{segment address: (segment bytes, bytes in active_allocated blocks)}."""
    out: dict = {}
    for a, sb, bb, st in zip(addr, seg_bytes, block_bytes, state):
        _, used = out.get(int(a), (0, 0))
        out[int(a)] = (int(sb), used + (int(bb) if st == "active_allocated" else 0))
    return out


def segments_at_end(trace) -> dict:
    """The segment map replayed from the start map and the event stream, at the last event,
    against the allocator's own snapshot taken when the capture stopped (the "end" rows)."""
    from profiler.analysis import segment_map_at

    replayed = segment_map_at(trace, len(trace.events) - 1)
    mine = _per_segment(replayed["segment_addr"], replayed["segment_bytes"], replayed["size_bytes"], replayed["state"])
    seg = trace.segments[trace.segments["snapshot"] == "end"]
    torch_map = _per_segment(seg["segment_addr"], seg["segment_bytes"], seg["block_bytes"], seg["state"])
    out = dict(
        segments=len(torch_map),
        same_addresses=sorted(mine) == sorted(torch_map),
        same_sizes_and_allocated=mine == torch_map,
        mismatches=[
            (hex(a), mine.get(a), torch_map.get(a))
            for a in sorted(set(mine) | set(torch_map))
            if mine.get(a) != torch_map.get(a)
        ][:10],
    )
    print(f"  segment map at the end, replayed vs allocator: {out}", flush=True)
    return out


def exact_run(step, name: str, path: str, steps: int = 6) -> dict:
    fresh()
    a0, f0 = stats_counts()
    with capture(path, name) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    a1, f1 = stats_counts()
    return exactness(prof.run_dir, torch.cuda.max_memory_allocated(), a1 - a0, f1 - f0)


@section("env")
def env():
    return dict(
        device=torch.cuda.get_device_name(),
        torch=torch.__version__,
        python=sys.version,
        cuda=torch.version.cuda,
        rounds=ROUNDS,
        steps=STEPS,
    )


@section("build")
def build_tracker():
    from profiler.capture import native

    t0 = time.perf_counter()
    module, error = native.load(cuda=True)
    out = dict(
        ok=module is not None,
        seconds=round(time.perf_counter() - t0, 2),
        compile_seconds=native.last_build_s,
        reads_frames=getattr(module, "reads_frames", None),
        error=error,
        cuda_include_dirs=native.cuda_include_dirs(),
        compilers={c: shutil.which(c) for c in ("c++", "g++", "ninja", "nvcc")},
        cuda_headers_found={
            d: sorted(os.listdir(d))[:5]
            for d in glob.glob(os.path.join(sys.prefix, "lib", "python3*", "site-packages", "nvidia", "*", "include"))
        },
    )
    print(f"  {out}", flush=True)
    return out


def gpt_step(compiled: bool):
    cfg = preset("gpt2-small")
    torch.manual_seed(0)
    model, opt = build(cfg, device="cuda", fused=True)
    batch = make_batch(cfg, device="cuda")
    run = torch.compile(model) if compiled else model

    def step():
        train_step(run, opt, batch, autocast_dtype=torch.bfloat16).item()

    return step


def compile_counts() -> dict:
    from torch._dynamo.utils import counters

    return dict(frames=int(counters["frames"]["total"]), graphs=int(counters["stats"]["unique_graphs"]))


@section("eager_overhead")
def eager_overhead():
    fresh()
    step = gpt_step(compiled=False)
    timed(step, 5)
    with capture("python", "warm"):  # first snapshot in a process is slow: not a round's cost
        timed(step, 1)
    times, metas = alternate(step, "eager")
    return dict(ratios(times), metas=metas, times_ms={k: [[t * 1e3 for t in r] for r in v] for k, v in times.items()})


@section("eager_exactness")
def eager_exactness():
    step = gpt_step(compiled=False)
    timed(step, 2)
    return {p: exact_run(step, "eager-exact", p) for p in PATHS}


@section("compiled_overhead")
def compiled_overhead():
    fresh()
    step = gpt_step(compiled=True)
    timed(step, 5)
    before = compile_counts()
    times, metas = alternate(step, "compiled")
    after = compile_counts()
    delta = {k: after[k] - before[k] for k in before}
    print(f"  recompiles during the captured and plain rounds: {delta}", flush=True)
    return dict(ratios(times), metas=metas, compiles_during_rounds=delta)


@section("compiled_exactness")
def compiled_exactness():
    """A fresh model compiled under each capture (so the capture maps its generated lines)."""
    out = {}
    for path in PATHS:
        torch._dynamo.reset()
        fresh()
        c0 = compile_counts()
        step = gpt_step(compiled=True)
        a0, f0 = stats_counts()
        with capture(path, "compiled-exact") as prof:
            for _ in range(8):
                step()
            torch.cuda.synchronize()
        a1, f1 = stats_counts()
        c1 = compile_counts()
        out[path] = exactness(prof.run_dir, torch.cuda.max_memory_allocated(), a1 - a0, f1 - f0)
        out[path]["compiles"] = {k: c1[k] - c0[k] for k in c0}
    torch._dynamo.reset()
    fresh()
    step = gpt_step(compiled=True)
    c0 = compile_counts()
    for _ in range(8):
        step()
    out["plain_compiles"] = {k: compile_counts()[k] - c0[k] for k in c0}
    print(f"  compiles: plain {out['plain_compiles']}, " + ", ".join(f"{p} {out[p]['compiles']}" for p in PATHS))
    return out


def main() -> int:
    if not torch.cuda.is_available():
        print("gpu_probe.py needs a CUDA device", file=sys.stderr)
        return 2
    env()
    build_tracker()
    eager_overhead()
    eager_exactness()
    compiled_overhead()
    compiled_exactness()
    save()
    print(f"\nresults: {OUT / 'gpu_probe.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
