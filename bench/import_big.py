"""Import time, peak memory and the Overview's open time for a big torch memory snapshot.

    python bench/import_big.py [--entries 1000000] [--keep DIR] [--unpickler]

Writes a snapshot in the shape `torch.cuda.memory._dump_snapshot` gives it, then runs
`vramscope import` on it in a child process (wall time and the child's peak RSS), then times
what the dashboard's Overview computes for the imported run (bench/dashboard.py's `overview`:
reading the trace as data.trace_of does, pairing lifetimes, the run summary, the peak, the
timeline with steps and phases, what is alive at the peak, and the figures).

The snapshot is built as torch builds it (torch/csrc/profiler/python/combined_traceback.cpp,
py_symbolize): every distinct frame is one dict, and every distinct traceback one list of those
dicts, so pickle writes each frame once and each traceback's list once. Every allocation and
every free request gathers its own traceback (record_memory_history's default context "all"),
110 to 240 frames deep (Python and C++ frames); a free_completed carries the traceback of its
request. The run is a training loop over 4 large segments: each step allocates 1,000 blocks,
requests their frees and completes them. The ring has wrapped: the history starts in the middle
of a step, so its first frees are of blocks allocated before it, which the import rebuilds.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MIB = 1 << 20
SEGMENT_BYTES = 256 * MIB
SEGMENTS = 4
BLOCKS_PER_STEP = 1000
FRAME_POOL = 4000


def _frames(rnd: random.Random) -> list[dict]:
    files = [f"/opt/conda/lib/python3.11/site-packages/torch/nn/modules/m{i}.py" for i in range(200)]
    return [
        {"filename": rnd.choice(files), "line": rnd.randrange(1, 3000), "name": f"fn_{i}"} for i in range(FRAME_POOL)
    ]


def _traceback(rnd: random.Random, pool: list[dict], trunk: list[dict]) -> list[dict]:
    """A new list (one per traceback), sharing the frame dicts: a common trunk and a varied tip."""
    depth = rnd.randint(110, 240)
    return trunk[: depth // 2] + [pool[rnd.randrange(len(pool))] for _ in range(depth - depth // 2)]


def build_snapshot(n_entries: int, seed: int = 0) -> dict:
    rnd = random.Random(seed)
    pool = _frames(rnd)
    trunk = pool[:100]
    base = 1 << 40
    per_step = 3 * BLOCKS_PER_STEP
    steps = -(-n_entries // per_step) + 1  # one more than needed: the ring's cut falls inside it
    entries: list[dict] = []
    t = 1_000_000
    for step in range(steps):
        at = base + (step % SEGMENTS) * SEGMENT_BYTES
        allocated = []
        for _ in range(BLOCKS_PER_STEP):
            size = 512 * rnd.randint(64, 256)  # 32 to 128 KiB, split off the segment
            entries.append(_entry("alloc", at, size, t, _traceback(rnd, pool, trunk)))
            allocated.append((at, size))
            at += size
            t += 3
        for addr, size in allocated:
            request = _traceback(rnd, pool, trunk)
            entries.append(_entry("free_requested", addr, size, t, request))
            entries.append(_entry("free_completed", addr, size, t + 1, request))
            t += 3
    # The ring keeps the newest n entries: the history starts inside the first step, after its allocations.
    entries = entries[-n_entries:]
    return {
        "segments": [_segment(base + k * SEGMENT_BYTES) for k in range(SEGMENTS)],
        "device_traces": [entries],
        "allocator_settings": {"expandable_segments": False},
        "torch_version": "2.13.0",
    }


def _entry(action: str, addr: int, size: int, t: int, frames: list) -> dict:
    return {"action": action, "addr": addr, "size": size, "stream": 0, "time_us": t, "frames": frames}


def _segment(addr: int) -> dict:
    """At the dump every block of the loop was freed: each segment is one inactive block."""
    return {
        "device": 0,
        "address": addr,
        "total_size": SEGMENT_BYTES,
        "allocated_size": 0,
        "active_size": 0,
        "requested_size": 0,
        "stream": 0,
        "segment_type": "large",
        "segment_pool_id": (0, 0),
        "is_expandable": False,
        "frames": [],
        "blocks": [{"address": addr, "size": SEGMENT_BYTES, "requested_size": 0, "state": "inactive", "frames": []}],
    }


# The child's own peak, from its memory map: a child's ru_maxrss also counts the parent's
# pages from before exec (a vfork'd child exec's from the parent's map), which here is the
# generator's whole snapshot.
_CHILD = """import sys
from profiler.cli import main
try:
    rc = main(sys.argv[1:])
finally:
    peak = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    sys.stderr.write(f"peak_rss_kib {peak.split()[1]}\\n")
sys.exit(rc)
"""


def import_in_child(pickle_path: Path, out: Path, stream: bool = True) -> dict:
    """`vramscope import` in a child process: wall and CPU seconds, and the child's peak RSS.
    `stream=False` reads the pickle with the standard unpickler (VRAMSCOPE_STREAM_IMPORT=0)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "VRAMSCOPE_STREAM_IMPORT": "1" if stream else "0"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, "import", str(pickle_path), "--out", str(out), "--name", "big"],
        capture_output=True,
        text=True,
        env=env,
    )
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"import failed: {done.stderr.strip()}")
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    peak_kib = int(done.stderr.rsplit("peak_rss_kib ", 1)[1].split()[0])
    cpu = usage.ru_utime + usage.ru_stime - before.ru_utime - before.ru_stime
    return {
        "import_s": round(seconds, 2),
        "import_cpu_s": round(cpu, 2),  # apart from waiting on a busy machine
        "import_peak_rss_bytes": peak_kib * 1024,
        "output": done.stdout.strip(),
    }


def overview_open(run: Path) -> dict:
    """Seconds for what the Overview computes on a first visit: reading the trace, then
    bench/dashboard.py's overview (loaded under another name: `dashboard` is the package)."""
    import importlib.util

    from profiler.trace.reader import load_trace

    spec = importlib.util.spec_from_file_location("bench_dashboard", REPO / "bench" / "dashboard.py")
    assert spec is not None and spec.loader is not None
    _bench_dashboard = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(_bench_dashboard)
    _bench_dashboard._quiet_streamlit()
    t0, c0 = time.perf_counter(), time.process_time()
    trace = load_trace(run)
    read_s = time.perf_counter() - t0
    parts = _bench_dashboard.overview(trace)
    return {
        "overview_read_s": round(read_s, 2),
        "overview_data_s": round(parts["data"], 2),
        "overview_figures_s": round(parts["figures"], 2),
        "overview_total_s": round(read_s + parts["data"] + parts["figures"], 2),
        "overview_cpu_s": round(time.process_time() - c0, 2),
        "events": len(trace.events),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument(
        "--keep", type=Path, default=None, help="write the pickle and the run here (default: a temporary folder)"
    )
    parser.add_argument(
        "--unpickler",
        action="store_true",
        help="also import with the standard unpickler (VRAMSCOPE_STREAM_IMPORT=0), the reader before streaming",
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        where = args.keep or Path(tmp)
        where.mkdir(parents=True, exist_ok=True)
        pickle_path = where / "big_snapshot.pickle"
        t0 = time.perf_counter()
        snap = build_snapshot(args.entries)
        with open(pickle_path, "wb") as f:
            pickle.dump(snap, f)  # as torch.cuda.memory._dump_snapshot does
        del snap
        facts = {"entries": args.entries, "pickle_bytes": pickle_path.stat().st_size}
        facts["generate_s"] = round(time.perf_counter() - t0, 1)
        facts.update(import_in_child(pickle_path, where / "runs"))
        facts["rss_over_pickle"] = round(facts["import_peak_rss_bytes"] / facts["pickle_bytes"], 2)
        if args.unpickler:
            facts["unpickler"] = import_in_child(pickle_path, where / "runs-unpickler", stream=False)
            facts["unpickler"]["rss_over_pickle"] = round(
                facts["unpickler"]["import_peak_rss_bytes"] / facts["pickle_bytes"], 2
            )
        facts["load_average"] = os.getloadavg()  # other jobs share the machine: they slow the wall figures
        (run,) = (where / "runs").iterdir()
        facts.update(overview_open(run))
    print(json.dumps(facts, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
