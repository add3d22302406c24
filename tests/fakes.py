"""Hand-built traces for unit tests: a few events described in plain tuples.

    ev = [("alloc", 0x100, 1024, "forward", "blocks.0"), ...]
    run_dir = write_trace(tmp_path, ev, steps=[...])

Events go through the real writer and finalize path, so categories, tags and
Parquet files are exactly what a capture would produce. reference_block_sizes is
the plain, per-event version of finalize's block replay loop.
"""

from __future__ import annotations

from pathlib import Path

from profiler.trace.tags import make_tag
from profiler.trace.writer import TraceWriter


def base_meta(**overrides) -> dict:
    meta = dict(
        backend="cpu",
        device="cpu",
        torch_version="test",
        config={},
        allocator_settings=None,
        baseline_allocated_bytes=0,
        max_allocated_bytes=0,
        max_reserved_bytes=None,
        events_dropped=0,
    )
    meta.update(overrides)
    return meta


def replay_peak(events, baseline=0) -> int:
    """Peak of baseline + alloc - free_requested over plain event tuples
    (free_completed when the events have no free_requested at all, as old traces)."""
    release = "free_requested" if any(e[0] == "free_requested" for e in events) else "free_completed"
    cur = peak = baseline
    for e in events:
        if e[0] == "alloc":
            cur += e[2]
        elif e[0] == release:
            cur -= e[2]
        peak = max(peak, cur)
    return peak


def write_trace(
    out_dir,
    events,
    *,
    name="fake",
    steps=None,
    roles=(),
    modules=(),
    phases=(),
    segments=(),
    status="complete",
    step_of=None,
    run_id=None,
    subdir=None,
    **meta,
) -> Path:
    """Write a trace directory. `events`: (action, addr, size, phase, module[, category]).

    `step_of(i)` gives the step of event i (default 0). `steps`: list of dicts for
    the steps table; by default one row per step seen, with replayed counters.
    `run_id` and `subdir` go to the writer: subdir="rank=1" writes one rank's partition.
    """
    events = list(events)
    peak = replay_peak(events, meta.get("baseline_allocated_bytes", 0))
    meta.setdefault("max_allocated_bytes", peak)
    w = TraceWriter(out_dir, name, base_meta(**meta), run_id=run_id, subdir=subdir)
    step_of = step_of or (lambda i: 0)
    if events:
        w.append(
            "events",
            {
                "ts_us": [1_000 + 10 * i for i in range(len(events))],
                "action": [e[0] for e in events],
                "addr": [e[1] for e in events],
                "size_bytes": [e[2] for e in events],
                "stream": [0] * len(events),
                "step": [step_of(i) for i in range(len(events))],
                "tag": [make_tag(e[3], e[4], e[5] if len(e) > 5 else None) for e in events],
                "stack_id": [None] * len(events),
            },
        )
    if steps is None:
        n_steps = 1 + max((step_of(i) for i in range(len(events))), default=0)
        steps = [
            dict(
                step=s,
                ts_us=1_000 + 10 * len(events) + s,
                allocated_bytes=0,
                reserved_bytes=None,
                max_allocated_bytes=peak,
            )
            for s in range(n_steps)
        ]
    if steps:
        w.append("steps", {k: [s.get(k) for s in steps] for k in steps[0]})
    for table, rows in (("roles", roles), ("modules", modules), ("phases", phases), ("segments", segments)):
        rows = list(rows)
        if rows:
            w.append(table, {k: [r.get(k) for r in rows] for k in rows[0]})
    w.flush()
    if status is None:  # leave it as a killed run would: journals, no status
        return w.run_dir
    return w.finalize(status)


def reference_block_sizes(actions, addrs, sizes, replay):
    """finalize.blocks.block_sizes as it was: one BlockReplay method call per event (the
    reference its inlined loop is held to)."""
    out = []
    for action, addr, size in zip(actions, addrs, sizes):
        if action == "alloc":
            out.append(replay.alloc(addr, size))
        elif action == "free_completed":
            out.append(replay.free(addr, size))
        elif action == "free_requested":
            b = replay.blocks.get(addr)
            out.append(b.size if b is not None and b.allocated else replay.rules.round_size(size))
        elif action == "segment_alloc":
            replay.segment_alloc(addr, size)
            out.append(None)
        elif action == "segment_free":
            replay.segment_free(addr, size)
            out.append(None)
        elif action == "segment_map":
            replay.segment_map(addr, size)
            out.append(None)
        elif action == "segment_unmap":
            replay.segment_unmap(addr, size)
            out.append(None)
        else:
            out.append(None)
    return out
