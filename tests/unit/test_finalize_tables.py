"""finalize/tables.py: raw journal tables in, published tables out; and its fast paths (dictionary
decoding with numpy, the inlined block replay) against the per-event Python they replaced."""

from __future__ import annotations

import random

import numpy as np
import pyarrow as pa
import pytest
from fakes import base_meta, reference_block_sizes

from profiler.trace import schema
from profiler.trace.finalize import tables
from profiler.trace.journal import read_journal
from profiler.trace.tags import make_tag, parse_tag
from profiler.trace.writer import TraceWriter


def _raw(events: list[tuple], steps: list[dict] = (), segments: list[dict] = (), roles: list[dict] = ()):
    """Raw tables as the journals hold them. events: (action, addr, size, step, tag)."""
    raw = {t: schema.empty_journal(t) for t in schema.TABLE_NAMES}
    if events:
        action, addr, size, step, tag = (list(c) for c in zip(*events))
        n = len(events)
        raw["events"] = pa.table(
            {
                "ts_us": list(range(n)),
                "action": action,
                "addr": addr,
                "size_bytes": size,
                "stream": [0] * n,
                "step": step,
                "tag": tag,
                "stack_id": [None] * n,
            },
            schema=schema.RAW_EVENTS,
        )
    for name, rows in (("steps", steps), ("segments", segments), ("roles", roles)):
        if rows:
            cols = {f.name: [r.get(f.name) for r in rows] for f in schema.JOURNALS[name]}
            raw[name] = pa.table(cols, schema=schema.JOURNALS[name])
    return raw


def test_a_cpu_stream_is_decoded_and_classified():
    events = [
        ("alloc", 0x10, 100, 0, make_tag("forward", "l1")),
        ("alloc", 0x20, 50, 0, make_tag("forward", "l2", "kv_cache")),
        ("free_completed", 0x10, 100, 0, make_tag("backward", "l1")),
        ("oom", 0, 0, 0, None),
    ]
    facts: dict = {}
    out = tables.finalize_tables(_raw(events), {"backend": "cpu"}, facts)
    assert set(out) == set(schema.TABLE_NAMES) and facts == {}
    for name, tbl in out.items():
        assert tbl.schema.equals(schema.TABLES[name]), name
    ev = out["events"]
    assert ev.column("block_bytes").to_pylist() == [100, 50, 100, 0]  # on CPU, the storage size itself
    assert ev.column("module").to_pylist() == ["l1", "l2", "l1", None]
    assert ev.column("phase").to_pylist() == ["forward", "forward", "backward", None]
    assert ev.column("category").to_pylist() == ["activation", "kv_cache", "activation", None]
    assert ev.column("module").chunk(0).dictionary.to_pylist() == ["l1", "l2"]  # in order of appearance


def test_markers_set_steps_and_are_published_without_a_phase():
    marker = "#m:0:1"
    events = [
        ("alloc", 0x10, 100, 0, make_tag("forward", "l1")),
        ("alloc", 0x90, 512, 0, marker),
        ("free_completed", 0x90, 512, 0, marker),
        ("free_completed", 0x10, 100, 0, make_tag("forward", "l1")),
    ]
    ev = tables.finalize_tables(_raw(events), {"backend": "cpu"})["events"]
    assert ev.column("step").to_pylist() == [0, 1, 1, 1]
    assert ev.column("phase").to_pylist() == ["forward", None, None, "forward"]
    # The marker sits inside the forward span without ending it: 0x10 is freed within it.
    assert ev.column("category").to_pylist() == ["temporary", "other", "other", "temporary"]


def test_cuda_block_bytes_are_replayed_from_the_start_snapshot():
    seg = dict(
        snapshot="start",
        ts_us=0,
        event_index=0,
        segment_addr=0x1000,
        segment_bytes=20 << 20,
        segment_type="large",
        block_addr=0x1000,
        block_bytes=20 << 20,
        state="inactive",
    )
    live = dict(
        seg,
        block_addr=0x9000,
        block_bytes=512,
        state="active_allocated",
        segment_addr=0x9000,
        segment_bytes=2 << 20,
        segment_type="small",
    )
    events = [("alloc", 0x1000, 1000, 0, make_tag("forward", "l1")), ("alloc", 0x5, 1, 0, None)]
    facts: dict = {}
    out = tables.finalize_tables(
        _raw(
            events,
            segments=[seg, live],
            roles=[dict(ts_us=0, event_index=0, addr=0x9000, size_bytes=512, role="parameter")],
        ),
        {"backend": "cuda", "allocator_settings": None},
        facts,
    )
    assert out["events"].column("block_bytes").to_pylist() == [1024, 512]  # 0x5 is no block: a miss
    assert facts == {"block_replay_misses": 1}
    # The baseline block the role names is published with its category.
    assert out["segments"].column("category").to_pylist() == [None, "parameter"]


def test_unhooked_steps_take_modules_from_templates():
    tag = make_tag("forward", "l1")
    events = [("alloc", 0x10, 100, 0, tag), ("alloc", 0x10, 100, 1, make_tag("forward", None))]
    steps = [
        dict(step=0, ts_us=1, allocated_bytes=0, modules_hooked=True),
        dict(step=1, ts_us=2, allocated_bytes=0, modules_hooked=False),
    ]
    facts: dict = {}
    out = tables.finalize_tables(_raw(events, steps=steps), {"backend": "cpu"}, facts)
    assert out["events"].column("module").to_pylist() == ["l1", "l1"]
    assert facts == {
        "steps_from_template": 1,
        "steps_without_template": 0,
        "steps_aligned_to_template": 0,
        "events_without_template": 0,
        "template_steps": [1],
    }


def test_a_template_filled_step_gets_forward_rows_in_the_phases_table():
    """Step 1 ran unhooked with bigger tensors: its events take step 0's phases and
    modules, and its phase rows are rebuilt from them (the capture saw one long backward)."""
    f0, b0 = make_tag("forward", "l1"), make_tag("backward", "l1")
    f1, b1 = make_tag(None, None), make_tag("backward", None)  # no hooks: no module, no forward
    events = [
        ("alloc", 0x10, 100, 0, f0),  # ts 0
        ("alloc", 0x20, 100, 0, f0),
        ("free_completed", 0x20, 100, 0, f0),
        ("alloc", 0x30, 100, 0, b0),  # ts 3
        ("free_completed", 0x10, 100, 0, b0),
        ("free_completed", 0x30, 100, 0, b0),
        ("alloc", 0x10, 400, 1, f1),  # ts 6
        ("alloc", 0x20, 400, 1, f1),
        ("free_completed", 0x20, 400, 1, f1),
        ("alloc", 0x30, 400, 1, b1),  # ts 9
        ("free_completed", 0x10, 400, 1, b1),
        ("free_completed", 0x30, 400, 1, b1),
    ]
    steps = [
        dict(step=0, ts_us=5, allocated_bytes=0, modules_hooked=True),
        dict(step=1, ts_us=11, allocated_bytes=0, modules_hooked=False),
    ]
    raw = _raw(events, steps=steps)
    raw["events"] = raw["events"].set_column(7, "stack_id", pa.array([1, 2, 2, 3, 1, 3] * 2, pa.int64()))
    captured = [(0, "forward", 0, 3), (0, "backward", 3, 5), (1, "backward", 9, 11)]
    raw["phases"] = pa.table(
        dict(zip(("step", "phase", "ts_us_start", "ts_us_end"), map(list, zip(*captured)))),
        schema=schema.JOURNALS["phases"],
    )
    facts: dict = {}
    out = tables.finalize_tables(raw, {"backend": "cpu"}, facts)
    assert facts["steps_aligned_to_template"] == 1 and facts["steps_without_template"] == 0
    assert out["events"].column("module").to_pylist() == ["l1"] * 12
    assert out["events"].column("phase").to_pylist() == (["forward"] * 3 + ["backward"] * 3) * 2
    rows = out["phases"].to_pylist()
    assert [(r["step"], r["phase"], r["ts_us_start"], r["ts_us_end"]) for r in rows] == captured[:2] + [
        (1, "forward", 6, 8),
        (1, "backward", 9, 11),
    ]


def test_helpers():
    codes = np.array([2, -1, 0, 2])
    arr = tables._dict_array(codes, ["a", "b", "c"])
    assert arr.dictionary.to_pylist() == ["c", "a"] and arr.indices.to_pylist() == [0, None, 1, 0]
    phase = tables._fill_markers(np.array(["marker", "forward", "marker", "backward", "marker"], dtype=object))
    assert phase.tolist() == [None, "forward", "forward", "backward", "backward"]
    steps = pa.table({"step": pa.array([0, 1, 2], pa.int32()), "modules_hooked": [True, None, False]})
    assert tables._hooked_steps(steps) == {0, 1}
    assert tables._hooked_steps(steps.slice(0, 2)) is None  # every step hooked
    assert tables._hooked_steps(pa.table({"step": pa.array([0], pa.int32())})) is None


# -- fast paths against the plain ones -----------------------------------------------------------


def _reference_tag_parts(tag):
    """Phase, module and hint as before: every event's tag parsed on its own."""
    parsed = [parse_tag(t) for t in tag.to_pylist()]
    parts = []
    for part in range(3):
        values: dict = {}
        codes = [-1 if p[part] is None else values.setdefault(p[part], len(values)) for p in parsed]
        parts.append((list(values), np.array(codes, dtype=np.int64)))
    return parts


def _reference_dict_array(codes, values):
    return tables._encode(np.array(list(values) + [None], dtype=object)[codes])


REFERENCE = {
    "_strings": lambda table, name: np.array(table.column(name).to_pylist(), dtype=object),
    "_tag_parts": _reference_tag_parts,
    "_dict_array": _reference_dict_array,
    "_pylist": lambda col: col.to_pylist(),
    "block_sizes": reference_block_sizes,
}


def _synthetic_raw(tmp_path, backend: str, seed: int) -> tuple[dict, dict]:
    """Raw tables of a small synthetic capture, through the real journals."""
    rng = random.Random(seed)
    meta = base_meta(backend=backend)
    w = TraceWriter(tmp_path, f"synthetic-{backend}-{seed}", meta)
    seg_addrs = [0x10_0000 * (i + 1) for i in range(6)]
    if backend == "cuda":
        w.append(
            "segments",
            {
                "snapshot": ["start"] * 6,
                "ts_us": [0] * 6,
                "event_index": [0] * 6,
                "segment_addr": seg_addrs,
                "segment_bytes": [2 << 20 if i % 2 else 20 << 20 for i in range(6)],
                "stream": [0] * 6,
                "segment_type": ["small" if i % 2 else "large" for i in range(6)],
                "is_expandable": [False] * 6,
                "block_addr": seg_addrs,
                "block_bytes": [2 << 20 if i % 2 else 20 << 20 for i in range(6)],
                "requested_bytes": [None] * 6,
                "state": ["inactive"] * 5 + ["active_allocated"],
            },
        )
    phases = ["forward", "backward", "optimizer", "recompute", "eval", None]
    tags = [
        make_tag(
            rng.choice(phases),
            rng.choice([None, "enc", "enc.0", "dec.1"]),
            rng.choice([None, None, "kv_cache", "bogus"]),
        )
        for _ in range(25)
    ]
    tags += [None, "", "#m:0:1", "a|b|c|d"]
    live: list[tuple[int, int]] = []
    ts = 0
    for step in range(6):
        cols = {k: [] for k in ("ts_us", "action", "addr", "size_bytes", "stream", "step", "tag", "stack_id")}

        def add(action, addr, size, tag, stack):  # called within this iteration: binds cols and step late
            nonlocal ts
            ts += rng.randint(0, 5)
            for k, v in zip(cols, (ts, action, addr, size, 0, step, tag, stack)):  # noqa: B023
                cols[k].append(v)  # noqa: B023

        for _ in range(rng.randint(50, 120)):
            if live and rng.random() < 0.45:
                addr, size = live.pop(rng.randrange(len(live)))
                tag = rng.choice(tags)
                add("free_requested", addr, size, tag, None)
                add("free_completed", addr, size, tag, None)
            else:
                addr = rng.choice(seg_addrs) + 512 * rng.randrange(64)
                size = rng.choice([1, 512, 1000, 4096, 1 << 20])
                live.append((addr, size))
                add("alloc", addr, size, rng.choice(tags), rng.choice([None, 1, 2, 3]))
        if step == 3:
            add("segment_alloc", 0x90_0000, 2 << 20, None, None)
            add("oom", 0, 0, None, None)
        w.append("events", cols)
        w.append(
            "roles",
            {
                "ts_us": [ts],
                "event_index": [rng.randrange(1, 200)],
                "step": [step],
                "addr": [rng.choice(live)[0] if live else seg_addrs[5]],
                "size_bytes": [512],
                "role": [rng.choice(["parameter", "gradient", "optimizer_state", "buffer"])],
                "name": [f"p{step}"],
            },
        )
        w.flush()
    raw = {t: read_journal(w.run_dir / schema.journal_name(t), s) for t, s in w._schemas.items()}
    return raw, w.meta


@pytest.mark.parametrize("backend", ["cpu", "cuda"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_finalize_output_is_unchanged_by_the_fast_paths(tmp_path, monkeypatch, backend, seed):
    raw, meta = _synthetic_raw(tmp_path, backend, seed)
    fast_facts: dict = {}
    fast = tables.finalize_tables(raw, meta, fast_facts)
    for name, reference in REFERENCE.items():
        monkeypatch.setattr(tables, name, reference)
    slow_facts: dict = {}
    slow = tables.finalize_tables(raw, meta, slow_facts)
    assert fast_facts == slow_facts
    assert set(fast) == set(slow) == set(schema.TABLE_NAMES)
    for name in fast:
        assert fast[name].schema.equals(slow[name].schema), name
        assert fast[name].equals(slow[name]), name
    events = fast["events"]
    assert events.num_rows > 300 and events.column("category").null_count < events.num_rows
    # Step markers (tag "#m:...") are in the stream and never published as a phase.
    assert tables.MARKER_PHASE in tables._tag_parts(raw["events"].column("tag"))[0][0]
    assert tables.MARKER_PHASE not in events.column("phase").to_pylist()
    if backend == "cuda":
        assert "block_replay_misses" in fast_facts


@pytest.mark.parametrize("seed", range(6))
def test_dict_array_matches_dictionary_encoding(seed):
    rng = np.random.default_rng(seed)
    k = int(rng.integers(0, 6))
    values = [f"v{i}" for i in range(k)]
    n = int(rng.integers(0, 50))
    codes = rng.integers(-1, k, n) if k else np.full(n, -1)
    if seed == 0:
        codes = np.full(n, -1)
    fast = tables._dict_array(codes, values)
    slow = _reference_dict_array(codes, values)
    assert fast.type == slow.type and fast.equals(slow)


def test_strings_decode_through_the_dictionary():
    arr = pa.array(["free_completed", None, "alloc", "alloc", None], pa.string()).dictionary_encode()
    tbl = pa.table({"action": arr})
    assert tables._strings(tbl, "action").tolist() == arr.to_pylist()
    plain = pa.table({"action": pa.array(["a", None, "b"])})  # not dictionary-encoded
    assert tables._strings(plain, "action").tolist() == ["a", None, "b"]
