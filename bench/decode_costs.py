"""What each part of a capture costs in decode loops, where per-event costs dominate.

    python bench/decode_costs.py [--json bench/results/decode_costs.json] [--tokens 256] [--rounds 2]
                                 [--profile-dir DIR]

For the concat-cache decode and the generate() rows of bench/overhead.py, each variant of
the capture (full; no stacks; no module hooks; neither; no periodic hooked steps) runs
against no capture, all of them in each round in a rotating order (a shared machine's
drift hits them alike), and gives its median, mean and worst-step ratios. One captured
round of each row then runs under cProfile: the capture's heaviest Python functions, per
call and in all. The native tracker's own cost, paid inside the allocator's calls, is
measured apart: nanoseconds per allocator event from a loop of small allocations made at
a shallow and at a deep Python stack.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import json
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import overhead_rows as rows  # noqa: E402
from bench.overhead import ratios  # noqa: E402

VARIANTS = {
    "full": {},
    "no_stacks": {"stacks": False},
    "no_modules": {"modules": False},
    "no_stacks_no_modules": {"stacks": False, "modules": False},
    "no_periodic_hooks": {"hooked_steps": (3, 0)},
    # No per-token step ends (no boundaries, kv rows or markers), no stacks, no module hooks:
    # what is left is the tracker inside the allocator and the wrap of transformers' caches.
    "tracker_only": {"stacks": False, "modules": False, "explicit_steps": True},
}

# The capture's entry points on a decode loop's thread, timed inclusively by parts_round
# (class, attribute); nested ones are reported too, so their totals overlap.
TIMED_PARTS = (
    ("profiler.capture.inference:InferenceSteps", "_pre"),
    ("profiler.capture.inference:InferenceSteps", "_post"),
    ("profiler.capture.session:Profiler", "_boundary"),
    ("profiler.capture.session:Profiler", "_drain"),
    ("profiler.capture.session:Profiler", "step"),
    ("profiler.capture.hf_cache:CacheWatch", "remember"),
    ("profiler.capture.hf_cache:CacheWatch", "measure"),
    ("profiler.capture.modules:ModuleTracer", "_pre_forward"),
    ("profiler.capture.modules:ModuleTracer", "_post_forward"),
    ("profiler.capture.modules:ModuleTracer", "push_hint"),
    ("profiler.capture.modules:ModuleTracer", "pop_hint"),
    ("profiler.capture.modules:ModuleTracer", "retag"),
)


def round_function(row: str, tokens: int):
    """The row's own round (one callable taking the profiler or None), its model built and warm."""
    if row == "generate":
        return rows.generate_round(tokens)
    return rows.decode_round(row.removeprefix("decode_"), tokens)


def variants_round_robin(run_round, rounds: int, names: list[str]) -> dict:
    """Each round runs no capture and every variant once, in a rotating order; one untimed
    captured round per variant first."""
    out = rows.trace_dir()
    for name in names:
        with rows._capture(out, f"warm-{name}", "auto", VARIANTS[name]) as prof:
            run_round(prof)
    order = ["plain", *names]
    times: dict[str, list] = {name: [] for name in order}
    collections = {name: rows.GcClock() for name in order}
    for r in range(rounds):
        for name in order[r % len(order) :] + order[: r % len(order)]:
            if name == "plain":
                with collections[name]:
                    times[name].append(run_round(None))
                continue
            with rows._capture(out, name, "auto", VARIANTS[name]) as prof, collections[name]:
                times[name].append(run_round(prof))
    return {
        name: dict(ratios(times["plain"], times[name]), garbage_collection=collections[name].summary())
        for name in names
    } | {"plain": dict(garbage_collection=collections["plain"].summary())}


def parts_round(row: str, tokens: int, rounds: int = 2) -> dict:
    """Where a captured round's extra time goes, without a profiler's own cost: each of
    TIMED_PARTS is wrapped in a clock (about 0.2 us a call), plain and captured rounds
    alternate, and the per-token time of each part is set against the per-token difference.
    What the parts and the tracker (events x event_cost) leave unexplained is the rest."""
    import importlib

    run_round = round_function(row, tokens)
    clocks: dict[str, list] = {}  # "Class.attr" -> [calls, seconds]
    marks: list[tuple] = []  # ("_boundary" or "_drain", step index after it, hooks on)
    originals = []
    for where, attr in TIMED_PARTS:
        module, cls_name = where.split(":")
        cls = getattr(importlib.import_module(module), cls_name)
        original = cls.__dict__[attr]
        clock = clocks.setdefault(f"{cls_name}.{attr}", [0, 0.0])

        def timed(*args, _original=original, _clock=clock, _name=attr, **kwargs):
            t = time.perf_counter()
            try:
                return _original(*args, **kwargs)
            finally:
                _clock[0] += 1
                _clock[1] += time.perf_counter() - t
                if _name in ("_boundary", "_drain"):  # which steps were hooked, and where drains fell
                    marks.append((_name, args[0].step_index, args[0]._hooks_on))

        originals.append((cls, attr, original))
        setattr(cls, attr, timed)
    out = rows.trace_dir()
    plain: list = []
    captured: list = []
    gc_clocks = {"plain": rows.GcClock(), "captured": rows.GcClock()}
    # Where the time of the rounds went: wall, this thread's CPU, every other thread's CPU
    # (spinning helper threads would show there), and minor page faults (fresh memory).
    used = {k: dict.fromkeys(("wall_s", "thread_cpu_s", "other_threads_cpu_s", "minor_faults"), 0.0) for k in gc_clocks}
    try:
        with rows._capture(out, "warm", "auto") as prof:
            run_round(prof)
        for c in clocks.values():
            c[:] = [0, 0.0]
        kinds: dict[str, list[float]] = {"hooked": [], "unhooked": [], "drained": []}
        for _ in range(rounds):
            with gc_clocks["plain"], _resources(used["plain"]):
                plain.append(run_round(None))
            marks.clear()
            with rows._capture(out, "parts", "auto") as prof, gc_clocks["captured"], _resources(used["captured"]):
                captured.append(run_round(prof))
            _sort_tokens(captured[-1], list(marks), kinds)
        meta = json.loads((Path(prof.run_dir) / "meta.json").read_text())
    finally:
        for cls, attr, original in originals:
            setattr(cls, attr, original)
    n_tokens = sum(len(r) for r in captured)
    per_token = {
        name: dict(calls_per_token=calls / n_tokens, us_per_token=seconds * 1e6 / n_tokens)
        for name, (calls, seconds) in clocks.items()
        if calls
    }
    return dict(
        ratios(plain, captured),
        extra_us_per_token=(sum(map(sum, captured)) - sum(map(sum, plain))) * 1e6 / n_tokens,
        events_per_token=(meta.get("events_seen") or 0) / max(1, len(captured[-1])),
        parts=per_token,
        per_token={k: {name: v / n_tokens for name, v in u.items()} for k, u in used.items()},
        garbage_collection={k: v.summary() for k, v in gc_clocks.items()},
        token_ms_by_kind={
            k: dict(tokens=len(v), mean=statistics.mean(v) * 1e3 if v else None) for k, v in kinds.items()
        },
        plain_token_ms=statistics.mean(t for r in plain for t in r[1:]) * 1e3,
    )


def _sort_tokens(times: list[float], marks: list[tuple], kinds: dict) -> None:
    """Token times of one captured round by kind: a hooked step, an unhooked step that drained,
    another. Token i of a round is the forward of step i + 1 (step 0 is the prefill)."""
    hooked = {index for name, index, hooks_on in marks if name == "_boundary" and hooks_on}
    drained = {index for name, index, _ in marks if name == "_drain"}
    for i, t in enumerate(times[1:], start=1):
        kinds["hooked" if i + 1 in hooked else "drained" if i + 1 in drained else "unhooked"].append(t)


def event_cost(iterations: int = 20000) -> dict:
    """Nanoseconds per allocator event that the native tracker adds, from a loop of small
    allocations (an alloc, a free_requested and a free_completed each) made at a shallow and
    at a deep Python stack: without a capture, with one without stacks, with one with stacks."""

    def allocate(n):
        for _ in range(n):
            torch.empty(256, device="cuda")

    def at_depth(d, n):
        return allocate(n) if d == 0 else at_depth(d - 1, n)

    def per_iteration_ns(depth) -> float:
        best = float("inf")
        for _ in range(3):
            t = time.perf_counter()
            at_depth(depth, iterations)
            best = min(best, time.perf_counter() - t)
        return best / iterations * 1e9

    out = rows.trace_dir()
    got: dict = {}
    for depth in (2, 40):
        plain = per_iteration_ns(depth)
        with rows._capture(out, "events", "auto", dict(stacks=False, modules=False)):
            no_stacks = per_iteration_ns(depth)
        with rows._capture(out, "events", "auto", dict(modules=False)) as prof:
            stacks = per_iteration_ns(depth)
        got[f"depth_{depth}"] = dict(
            plain_ns_per_iteration=plain,
            tracker_ns_per_event=(no_stacks - plain) / 3,
            tracker_with_stacks_ns_per_event=(stacks - plain) / 3,
        )
    got["capture_path"] = rows._run_facts(prof)["capture_path"]
    return got


def profiled_round(row: str, tokens: int, profile_path: Path | None) -> dict:
    """One captured round under cProfile (after an untimed one): the capture's heaviest functions."""
    run_round = round_function(row, tokens)
    out = rows.trace_dir()
    with rows._capture(out, "warm", "auto") as prof:
        run_round(prof)
    captured: dict = {"stats": cProfile.Profile()}
    with rows._capture(out, "profiled", "auto") as prof:
        captured["stats"].enable()
        t0 = time.perf_counter()
        captured["times"] = run_round(prof)
        captured["seconds"] = time.perf_counter() - t0
        captured["stats"].disable()
    captured["meta"] = json.loads((Path(prof.run_dir) / "meta.json").read_text())
    stats = pstats.Stats(captured["stats"])
    if profile_path is not None:
        stats.dump_stats(str(profile_path))
    meta = captured["meta"]
    steps = max(1, int(meta.get("steps_completed") or len(captured["times"])))
    heavy = []
    for (file, line, fn), (_cc, calls, tottime, cumtime, _callers) in stats.stats.items():
        if "/profiler/" in file or "/workloads/" in file:
            heavy.append(
                dict(
                    function=f"{Path(file).parent.name}/{Path(file).name}:{line} {fn}",
                    calls=calls,
                    own_ms=tottime * 1e3,
                    total_ms=cumtime * 1e3,
                    total_us_per_token=cumtime * 1e6 / len(captured["times"]),
                )
            )
    heavy.sort(key=lambda h: -h["total_ms"])
    text = io.StringIO()
    pstats.Stats(captured["stats"], stream=text).sort_stats("tottime").print_stats(25)
    return dict(
        seconds=captured["seconds"],
        tokens=len(captured["times"]),
        events_seen=meta.get("events_seen"),
        events_per_step=(meta.get("events_seen") or 0) / steps,
        steps_completed=meta.get("steps_completed"),
        capture_functions=heavy[:40],
        top_by_own_time=text.getvalue()[-6000:],
    )


@contextlib.contextmanager
def _resources(into: dict):
    """Add the wall time, this thread's and the other threads' CPU time and the minor page
    faults of the block to `into`."""
    import resource

    def now():
        return (
            time.perf_counter(),
            time.thread_time(),
            time.process_time(),
            resource.getrusage(resource.RUSAGE_SELF).ru_minflt,
        )

    w0, t0, p0, f0 = now()
    try:
        yield
    finally:
        w1, t1, p1, f1 = now()
        into["wall_s"] += w1 - w0
        into["thread_cpu_s"] += t1 - t0
        into["other_threads_cpu_s"] += (p1 - p0) - (t1 - t0)
        into["minor_faults"] += f1 - f0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default="bench/results/decode_costs.json")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--rows", nargs="+", default=["decode_concat", "generate"])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--profile-dir", default=None, help="where each row's cProfile stats are written")
    ap.add_argument("--no-cprofile", action="store_true", help="skip the cProfile'd round")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("decode_costs.py needs a CUDA device", file=sys.stderr)
        return 2
    results: dict = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, rows={})
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    results["event_cost"] = event_cost()
    print("tracker:", json.dumps(results["event_cost"]), flush=True)
    for row in args.rows:
        got = results["rows"][row] = variants_round_robin(round_function(row, args.tokens), args.rounds, args.variants)
        for name, r in got.items():
            if name == "plain":
                continue
            print(
                f"{row:14s} {name:22s} median {r['median_ratio']:.3f}x mean {r['mean_ratio']:.3f}x "
                f"worst {r['worst_step_ratio']:.2f}x (uncaptured {r['baseline_worst_step_ratio']:.2f}x, "
                f"baseline {r['baseline_median_ms']:.2f} ms)",
                flush=True,
            )
        path.write_text(json.dumps(results, indent=1, default=str))
        got["parts"] = parts = parts_round(row, args.tokens)
        ns_per_event = results["event_cost"]["depth_40"]["tracker_with_stacks_ns_per_event"]
        tracker_us = parts["events_per_token"] * ns_per_event / 1e3
        print(
            f"{row}: {parts['extra_us_per_token']:.0f} us/token extra (mean {parts['mean_ratio']:.3f}x), "
            f"tracker about {tracker_us:.0f} us/token ({parts['events_per_token']:.0f} events); "
            f"per token {json.dumps(parts['per_token'])}; gc " + json.dumps(parts["garbage_collection"]),
            flush=True,
        )
        for name, p in sorted(parts["parts"].items(), key=lambda kv: -kv[1]["us_per_token"]):
            print(f"   {p['us_per_token']:8.1f} us/token {p['calls_per_token']:6.1f} calls/token  {name}", flush=True)
        path.write_text(json.dumps(results, indent=1, default=str))
        if args.no_cprofile:
            continue
        where = Path(args.profile_dir) / f"{row}.pstats" if args.profile_dir else None
        got["profiled"] = prof = profiled_round(row, args.tokens, where)
        print(f"{row}: {prof['events_per_step']:.0f} events per step, {prof['tokens']} tokens", flush=True)
        for h in prof["capture_functions"][:12]:
            print(f"   {h['total_us_per_token']:8.1f} us/token {h['calls']:7d} calls  {h['function']}", flush=True)
        path.write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
