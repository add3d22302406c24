"""What the trace writer costs and how small its files are, on this machine's CPU.

    python bench/writer.py [--events 2100000] [--per-step 3000] [--no-variants]

Feeds a synthetic allocator stream, shaped like what the CUDA drain hands the
writer (Python tuples per column), through TraceWriter.append + flush (the
journal, paid in the profiled process as often as every step; each flush also
updates meta.json, as the session's flushes do) and through finalize (journals
to Parquet, paid once at the end), and prints:

- events/s of journal append + flush, over the whole stream and for the median step;
- events/s of finalize to Parquet (read journals, finalize_tables, write Parquet),
  on the CPU backend (no block replay) and CUDA-style (block sizes replayed
  over a start snapshot);
- bytes/event of events.parquet on disk, against torch's memory_viz pickle
  (~87 B/event is the usual figure; the pickle of these very events in the
  snapshot's format is measured too);
- what each Parquet encoding choice buys: the events table rewritten with one
  setting changed at a time, bytes per event in all and per column.

The stream: ~3000 events a step as alloc / free_requested / free_completed,
addresses handed out by a caching-allocator-like free list per size class
from a pool of a few thousand blocks, power-of-two-ish sizes, timestamps
growing by a few microseconds, a few hundred distinct tags, stack ids on
allocs only. Steps repeat one program with drift (changed sizes, another free
block picked now and then), as training loops do. Events stay in stream order.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import pickle
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from profiler.trace import schema  # noqa: E402
from profiler.trace import writer as writer_module  # noqa: E402
from profiler.trace.tags import make_tag  # noqa: E402
from profiler.trace.writer import TraceWriter, parquet_options  # noqa: E402

MEMORY_VIZ_B_PER_EVENT = 87  # the usual figure for a memory_viz snapshot pickle
SIDE_STREAM = 94_519_734_567_936
SLOTS_PER_SEGMENT = 16  # a cudaStream_t pointer, as torch records non-default streams

# -- synthetic stream ------------------------------------------------------------------------


def _size_classes(rng: np.random.Generator, n: int) -> np.ndarray:
    """Requested sizes: powers of two and 1.5x powers of two, 512 B .. 64 MiB, small ones common."""
    exp = np.clip(rng.gamma(3.0, 2.2, n).astype(np.int64) + 9, 9, 26)
    base = np.left_shift(np.int64(1), exp)
    eighths = np.where(rng.random(n) < 0.5, 0, rng.integers(1, 8, n))  # shapes are not all 2^k
    return base + (base // 8) * eighths


def _step_program(rng: np.random.Generator, allocs: int, n_tags: int, n_sites: int):
    """One training step: (kind, alloc slot k) pairs, kind 0 = alloc and 1 = free.

    Forward allocations are kept (activations) or freed within a few events
    (temporaries); kept ones are freed in reverse order in backward, where
    gradients' temporaries come and go. Returns the event order and per-alloc
    size, tag and stack site.
    """
    sizes = _size_classes(rng, allocs)
    order: list[tuple[int, int]] = []
    kept: list[int] = []
    pending: list[tuple[int, int]] = []  # (free after this many more events, k)
    half = allocs * 5 // 8
    for k in range(allocs):
        order.append((0, k))
        if k < half and rng.random() < 0.45:
            kept.append(k)
        else:
            pending.append((int(rng.integers(0, 4)), k))
        still = []
        for wait, j in pending:
            if wait <= 0:
                order.append((1, j))
            else:
                still.append((wait - 1, j))
        pending = still
        if k >= half and kept and rng.random() < 0.8:
            order.append((1, kept.pop()))
    order += [(1, j) for _, j in pending] + [(1, j) for j in reversed(kept)]
    # Tags follow the position in the step: a phase and the module being run.
    phase_of = np.where(np.arange(allocs) < half, 0, 1)
    phase_of[allocs - allocs // 16 :] = 2
    m = n_tags // 3
    k = np.arange(allocs)
    module_of = np.where(
        phase_of == 0,
        k * m // half,  # forward runs the modules in order
        (allocs - 1 - k) * m // (allocs - half),
    )  # backward in reverse
    module_of = np.where(phase_of == 2, k % m, module_of)  # the optimizer visits them all
    tags = phase_of * (n_tags // 3) + module_of
    sites = rng.integers(0, n_sites, allocs)
    return order, sizes, tags, sites


def synthetic_events(
    n_events: int = 2_100_000, per_step: int = 3000, seed: int = 0, n_tags: int = 300, n_sites: int = 1500
):
    """Capture-side chunks, one per step: dicts of Python tuples/lists as the drain makes them.

    Also returns the start snapshot (segment rows) that makes every address a block the
    replay knows, so the CUDA-style finalize does the real work.
    """
    rng = np.random.default_rng(seed)
    allocs = per_step // 3
    order, sizes, tags, sites = _step_program(rng, allocs, n_tags, n_sites)
    phases = ("forward", "backward", "optimizer")
    tag_names = [
        make_tag(
            phases[t // (n_tags // 3)], f"model.layers.{t % (n_tags // 3)}.mlp", "kv_cache" if t % 97 == 5 else None
        )
        for t in range(n_tags)
    ]

    free_lists: dict[int, list[int]] = {}
    slot_bytes: dict[int, int] = {}
    next_addr = 0x7F00_0000_0000
    ts = 1_700_000_000_000_000
    chunks = []
    step = 0
    total = 0
    while total < n_events:
        # Drift: some sizes change (dynamic shapes); requests wobble below their size class.
        step_sizes = sizes.copy()
        drift = rng.random(allocs) < 0.05
        step_sizes[drift] = _size_classes(rng, int(drift.sum()))
        requested = step_sizes - rng.integers(0, 4, allocs) * 2 * (step_sizes > 4096)
        deltas = rng.integers(1, 9, len(order) + 1) * rng.integers(1, 4, len(order) + 1)
        live: dict[int, int] = {}
        cols = {k: [] for k in ("ts_us", "action", "addr", "size_bytes", "stream", "tag", "stack_id")}
        ts_l, act_l, addr_l, size_l, stream_l, tag_l, stack_l = cols.values()
        side = rng.random(len(order)) < 0.01
        pick = rng.random(len(order))
        for i, (kind, k) in enumerate(order):
            ts += int(deltas[i])
            size = int(requested[k])
            if kind == 0:
                cls = int(step_sizes[k])
                fl = free_lists.get(cls)
                if not fl:  # a new segment, carved into a few blocks of this class
                    fl = free_lists.setdefault(cls, [])
                    block = cls + (-cls % 512)
                    for _ in range(SLOTS_PER_SEGMENT):
                        fl.append(next_addr)
                        slot_bytes[next_addr] = block
                        next_addr += block
                # Mostly the most recently freed block; now and then another free one.
                if pick[i] < 0.2 and len(fl) > 1:
                    addr = fl.pop(int(pick[i] * 5 * len(fl)))
                else:
                    addr = fl.pop()
                live[k] = addr
                ts_l.append(ts)
                act_l.append("alloc")
                addr_l.append(addr)
                size_l.append(size)
                stream_l.append(SIDE_STREAM if side[i] else 0)
                tag_l.append(tag_names[tags[k]])
                stack_l.append(int(sites[k]))
            else:
                addr = live.pop(k)
                for action in ("free_requested", "free_completed"):
                    ts_l.append(ts)
                    act_l.append(action)
                    addr_l.append(addr)
                    size_l.append(size)
                    stream_l.append(SIDE_STREAM if side[i] else 0)
                    tag_l.append(tag_names[tags[k]])
                    stack_l.append(None)
                    ts += 1
                free_lists[int(step_sizes[k])].append(addr)
        n = len(ts_l)
        cols = {k: tuple(v) for k, v in cols.items()}  # the drain hands over zip(*) tuples
        cols["step"] = [step] * n
        chunks.append(cols)
        total += n
        step += 1
        ts += 2_000
    segments = _start_snapshot(slot_bytes)
    return chunks, segments


def _start_snapshot(slot_bytes: dict[int, int]) -> dict:
    """One inactive block per pool address, each in a segment of its own: every alloc fits."""
    addrs = sorted(slot_bytes)
    n = len(addrs)
    return {
        "snapshot": ["start"] * n,
        "ts_us": [0] * n,
        "event_index": [0] * n,
        "segment_addr": addrs,
        "segment_bytes": [slot_bytes[a] for a in addrs],
        "stream": [0] * n,
        "segment_type": ["large"] * n,
        "is_expandable": [False] * n,
        "block_addr": addrs,
        "block_bytes": [slot_bytes[a] for a in addrs],
        "requested_bytes": [None] * n,
        "state": ["inactive"] * n,
    }


def meta(backend: str) -> dict:
    return dict(
        backend=backend,
        device="cuda:0" if backend == "cuda" else "cpu",
        torch_version="bench",
        config={},
        allocator_settings=None,
        baseline_allocated_bytes=0,
        max_allocated_bytes=0,
        max_reserved_bytes=None,
        events_dropped=0,
    )


# -- measurements ----------------------------------------------------------------------------


def live_meta(step: int, t: float) -> dict:
    """What the session passes to flush() each time (profiler.capture.session._live_meta)."""
    return dict(
        events_dropped=0,
        steps_completed=step,
        capture_host_s=round(t, 6),
        max_allocated_bytes=1 << 34,
        max_reserved_bytes=(1 << 34) + step * 512,
    )


def write_journals(out: Path, chunks: list, segments: dict | None, backend: str):
    """Append + flush every step's chunk; per-step seconds of each."""
    w = TraceWriter(out, "bench", meta(backend))
    if segments is not None:
        w.append("segments", segments)
    w.flush()
    append_s, flush_s = [], []
    clock = time.perf_counter
    for i, cols in enumerate(chunks):
        t0 = clock()
        w.append("events", cols)
        t1 = clock()
        w.flush(live_meta(i, t1))
        append_s.append(t1 - t0)
        flush_s.append(clock() - t1)
    return w, np.array(append_s), np.array(flush_s)


@contextlib.contextmanager
def _timed(module, name: str):
    """Seconds of each call of module.name made inside the block."""
    real = getattr(module, name)
    spent: list[float] = []

    def timed(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return real(*args, **kwargs)
        finally:
            spent.append(time.perf_counter() - t0)

    setattr(module, name, timed)
    try:
        yield spent
    finally:
        setattr(module, name, real)


def meta_write_s(out: Path, repeat: int = 200) -> float:
    """Median seconds of one meta.json update (json + temporary file + rename)."""
    from profiler.trace.writer import write_meta

    run = out / "meta-only"
    run.mkdir()
    m = dict(meta("cuda"), **live_meta(0, 0.0))
    times = []
    for i in range(repeat):
        m["steps_completed"] = i
        t0 = time.perf_counter()
        write_meta(run, m)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def snapshot_pickle_bytes(chunks: list) -> int:
    """Size of these events as torch's memory_viz snapshot trace, without stacks."""
    events = [
        {"action": a, "addr": ad, "size": s, "stream": st, "time_us": t, "frames": []}
        for c in chunks
        for t, a, ad, s, st in zip(c["ts_us"], c["action"], c["addr"], c["size_bytes"], c["stream"])
    ]
    return len(pickle.dumps(events, protocol=4))


def encoding_variants(names: list[str], base: dict) -> list[tuple[str, dict]]:
    """Parquet settings to compare, each one change away from the chosen ones (`base`)."""

    def but(**over):
        opts = dict(base)
        enc = dict(base.get("column_encoding") or {})
        enc.update(over.pop("enc", {}))
        opts["column_encoding"] = enc or None
        opts["use_dictionary"] = [c for c in names if c not in enc] if enc else True
        opts.update(over)
        return opts

    return [
        ("pyarrow defaults (snappy, dictionary everywhere)", {}),
        ("defaults + zstd 3", dict(compression="zstd", compression_level=3)),
        ("chosen: + ts_us DELTA_BINARY_PACKED", base),
        ("chosen, ts_us PLAIN instead", but(enc={"ts_us": "PLAIN"})),
        ("chosen, ts_us BYTE_STREAM_SPLIT instead", but(enc={"ts_us": "BYTE_STREAM_SPLIT"})),
        ("chosen + addr DELTA_BINARY_PACKED", but(enc={"addr": "DELTA_BINARY_PACKED"})),
        ("chosen + addr BYTE_STREAM_SPLIT", but(enc={"addr": "BYTE_STREAM_SPLIT"})),
        ("chosen + addr PLAIN", but(enc={"addr": "PLAIN"})),
        (
            "chosen + sizes BYTE_STREAM_SPLIT",
            but(enc={"size_bytes": "BYTE_STREAM_SPLIT", "block_bytes": "BYTE_STREAM_SPLIT"}),
        ),
        (
            "chosen + sizes DELTA_BINARY_PACKED",
            but(enc={"size_bytes": "DELTA_BINARY_PACKED", "block_bytes": "DELTA_BINARY_PACKED"}),
        ),
        ("chosen + stack_id DELTA_BINARY_PACKED", but(enc={"stack_id": "DELTA_BINARY_PACKED"})),
        ("chosen, zstd 1", but(compression_level=1)),
        ("chosen, zstd 9", but(compression_level=9)),
        ("chosen, zstd 15", but(compression_level=15)),
    ]


def parquet_bytes(table, opts: dict) -> tuple[int, dict[str, int], float]:
    """(file bytes, compressed bytes per column, seconds) of `table` written with `opts`."""
    import io

    import pyarrow.parquet as pq

    buf = io.BytesIO()
    t0 = time.perf_counter()
    pq.write_table(table, buf, **opts)
    seconds = time.perf_counter() - t0
    md = pq.ParquetFile(io.BytesIO(buf.getvalue())).metadata
    cols: dict[str, int] = {}
    for rg in range(md.num_row_groups):
        for c in range(md.num_columns):
            cc = md.row_group(rg).column(c)
            cols[cc.path_in_schema] = cols.get(cc.path_in_schema, 0) + cc.total_compressed_size
    return buf.getbuffer().nbytes, cols, seconds


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=2_100_000)
    ap.add_argument("--per-step", type=int, default=3000)
    ap.add_argument("--no-variants", action="store_true", help="skip the encoding comparison")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    chunks, segments = synthetic_events(args.events, args.per_step)
    n = sum(len(c["ts_us"]) for c in chunks)
    distinct = {k: len({v for c in chunks for v in c[k]}) for k in ("addr", "size_bytes", "tag", "stack_id")}
    print(
        f"stream: {n:,} events in {len(chunks)} steps of ~{args.per_step:,}; distinct addr "
        f"{distinct['addr']:,}, sizes {distinct['size_bytes']:,}, tags {distinct['tag']:,}, "
        f"stacks {distinct['stack_id'] - 1:,}; made in {time.perf_counter() - t0:.1f} s"
    )
    print(
        f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} "
        f"(timings are only as quiet as the machine)"
    )

    out = Path(tempfile.mkdtemp(prefix="vramscope-bench-writer-"))
    try:
        # One-time costs (pyarrow's first conversions, kernels) are paid before timing.
        write_journals(out / "warm", chunks[:20], None, "cpu")[0].finalize("complete")
        shutil.rmtree(out / "warm")
        gc.collect()
        results = {}
        for backend in ("cpu", "cuda"):
            w, append_s, flush_s = write_journals(
                out / backend, chunks, segments if backend == "cuda" else None, backend
            )
            journal_bytes = (w.run_dir / schema.journal_name("events")).stat().st_size
            with _timed(writer_module, "finalize_tables") as tables_s:
                t0 = time.perf_counter()
                w.finalize("complete")
                finalize_s = time.perf_counter() - t0
            results[backend] = dict(
                append_s=append_s,
                flush_s=flush_s,
                journal_bytes=journal_bytes,
                finalize_s=finalize_s,
                tables_s=sum(tables_s),
                misses=w.meta.get("block_replay_misses"),
                parquet_bytes=(w.run_dir / schema.parquet_name("events")).stat().st_size,
                run_dir=w.run_dir,
            )
        meta_s = meta_write_s(out)
        pickle_bytes = snapshot_pickle_bytes(chunks)
        load_after = os.getloadavg()[0]

        def rate(seconds: float) -> str:
            return f"{n / seconds / 1e6:5.2f} M ev/s"

        rows = []
        for backend, r in results.items():
            total = r["append_s"].sum() + r["flush_s"].sum()
            step = np.median(r["append_s"] + r["flush_s"])
            rows.append(
                (
                    f"journal append + flush ({backend} run)",
                    f"{rate(total)}  (median step {n / len(chunks) / step / 1e6:.2f})",
                    ">= 2 M ev/s",
                )
            )
        for backend, r in results.items():
            label = "CPU backend" if backend == "cpu" else "CUDA-style, block replay"
            rows.append(
                (
                    f"finalize to Parquet, {label}",
                    f"{rate(r['finalize_s'])}  ({r['finalize_s']:.2f} s, of which "
                    f"finalize_tables {r['tables_s']:.2f} s)",
                    "< 2 s" if backend == "cpu" else "",
                )
            )
        for backend, r in results.items():
            rows.append(
                (f"events.parquet on disk ({backend})", f"{r['parquet_bytes'] / n:5.2f} B/event", "<= 12 B/event")
            )
        rows.append(("memory_viz pickle (anchor)", f"{MEMORY_VIZ_B_PER_EVENT:5.2f} B/event", ""))
        rows.append(("these events as snapshot pickle, protocol 4, frames=[]", f"{pickle_bytes / n:5.2f} B/event", ""))
        width = max(len(r[0]) for r in rows)
        print()
        print(f"{'':{width}}  {'measured':30}  target")
        for label, value, target in rows:
            print(f"{label:{width}}  {value:30}  {target}")

        r = results["cuda"]
        steps = len(chunks)
        print(
            f"\nper step of ~{n // steps:,} events (median over {steps} steps): append "
            f"{np.median(r['append_s']) * 1e3:.2f} ms, flush {np.median(r['flush_s']) * 1e3:.2f} ms "
            f"(of which meta.json update {meta_s * 1e3:.2f} ms); p99 append+flush "
            f"{np.percentile(r['append_s'] + r['flush_s'], 99) * 1e3:.2f} ms; events journal "
            f"{r['journal_bytes'] / n:.1f} B/event (lz4); block replay misses {r['misses']}; "
            f"load average after {load_after:.2f}"
        )

        if not args.no_variants:
            import pyarrow.parquet as pq

            table = pq.read_table(r["run_dir"] / schema.parquet_name("events"))
            base = parquet_options(table.schema)
            print(f"\nevents.parquet encodings (CUDA-style table, {n:,} rows); B/event per column:")
            cols_shown = ("ts_us", "addr", "size_bytes", "block_bytes", "stack_id", "module")
            print(
                f"{'settings':52} {'total':>6} {'write s':>7}  " + " ".join(f"{c:>11}" for c in cols_shown) + "  other"
            )
            for label, opts in encoding_variants(table.schema.names, base):
                size, cols, seconds = parquet_bytes(table, opts)
                other = sum(v for k, v in cols.items() if k not in cols_shown)
                print(
                    f"{label:52} {size / n:6.2f} {seconds:7.2f}  "
                    + " ".join(f"{cols.get(c, 0) / n:11.3f}" for c in cols_shown)
                    + f"  {other / n:5.3f}"
                )
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
