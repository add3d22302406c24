"""The writer: journals that keep their whole batches however they were cut, cheap
flushes, and finalize fast paths that publish exactly what the plain ones did.

Finalize's fast paths (dictionary decoding with numpy, the inlined block replay)
are checked against reference versions kept here: the per-event Python they
replaced, verbatim in behaviour.
"""

from __future__ import annotations

import os
import random

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pytest

from fakes import base_meta
from profiler.trace.finalize import tables
from profiler.trace.finalize import blocks
from profiler.trace import journal as journal_module, schema
from profiler.trace.finalize.blocks import AllocatorRules, BlockReplay
from profiler.trace.schema import RAW_EVENTS
from profiler.trace.tags import make_tag, parse_tag
from profiler.trace.journal import read_journal
from profiler.trace.writer import TraceWriter

BATCH_ROWS = (5, 7, 3, 6)


# -- journals ---------------------------------------------------------------------------------
def _events(batch: int, n: int) -> dict:
    # New tags in every batch, so that each flush writes a replacement dictionary.
    return {
        "ts_us": list(range(batch * 100, batch * 100 + n)),
        "action": ["alloc", "free_requested", "free_completed"] * (n // 3) + ["alloc"] * (n % 3),
        "addr": [0x1000 * batch + 512 * i for i in range(n)],
        "size_bytes": [512 * (i + 1) for i in range(n)],
        "stream": [0] * n,
        "step": [batch] * n,
        "tag": [make_tag("forward", f"layers.{batch}.{i % 2}") if i % 4 else None for i in range(n)],
        "stack_id": [None if i % 2 else batch * 10 + i for i in range(n)],
    }


@pytest.fixture
def journal(tmp_path):
    """(path, bytes, batch ends): a killed run's events journal, its ends measured per flush."""
    w = TraceWriter(tmp_path, "journal", base_meta())
    path = w.run_dir / schema.journal_name("events")
    ends = []
    for b, n in enumerate(BATCH_ROWS):
        w.append("events", _events(b, n))
        w.flush({"steps_completed": b})
        ends.append(path.stat().st_size)
    return path, path.read_bytes(), ends


def _rows(tbl: pa.Table) -> list[tuple]:
    return list(zip(*tbl.to_pydict().values()))


def _prefix_rows(k: int) -> int:
    return sum(BATCH_ROWS[:k])


def _check_prefix(tbl: pa.Table, full: list[tuple], whole_batches: int) -> None:
    """At least the first `whole_batches` batches, exactly as written; schema as asked."""
    assert tbl.schema.equals(RAW_EVENTS)
    keep = _prefix_rows(whole_batches)
    assert keep <= tbl.num_rows
    assert _rows(tbl)[:keep] == full[:keep]
    assert all(c.num_chunks <= 1 for c in tbl.columns)


def test_whole_journal_reads_back(journal):
    path, data, ends = journal
    tbl = read_journal(path, RAW_EVENTS)
    assert tbl.num_rows == sum(BATCH_ROWS)
    assert tbl.column("step").to_pylist() == [b for b, n in enumerate(BATCH_ROWS) for _ in range(n)]
    assert tbl.column("tag").null_count == sum(-(-n // 4) for n in BATCH_ROWS)
    assert [c.num_chunks for c in tbl.columns] == [1] * tbl.num_columns


def test_truncated_journal_keeps_every_whole_batch(journal):
    path, data, ends = journal
    full = _rows(read_journal(path, RAW_EVENTS))
    near_ends = {e + d for e in ends for d in range(-24, 25)}
    offsets = sorted(o for o in near_ends | set(range(0, len(data), 7)) if 0 <= o <= len(data))
    for cut in offsets:
        path.write_bytes(data[:cut])
        tbl = read_journal(path, RAW_EVENTS)
        whole = sum(e <= cut for e in ends)
        _check_prefix(tbl, full, whole)
        assert tbl.num_rows == _prefix_rows(whole), cut  # a cut batch is dropped whole


def test_flipped_bytes_keep_the_batches_before_them(journal):
    path, data, ends = journal
    full = _rows(read_journal(path, RAW_EVENTS))
    rng = random.Random(0)
    for at in range(0, len(data), 5):
        raw = bytearray(data)
        raw[at] ^= rng.randrange(1, 256)
        path.write_bytes(bytes(raw))
        tbl = read_journal(path, RAW_EVENTS)  # never raises
        _check_prefix(tbl, full, sum(e <= at for e in ends))
        tbl.validate(full=True)


@pytest.mark.parametrize("closed", [False, True])
def test_appended_garbage_keeps_the_whole_journal(journal, closed):
    path, data, ends = journal
    full = _rows(read_journal(path, RAW_EVENTS))
    if closed:  # as finalize leaves it: an end-of-stream marker, then the garbage
        data += b"\xff\xff\xff\xff\x00\x00\x00\x00"
    rng = random.Random(1)
    tails = [b"\x00", b"\xff" * 4, b"\xff\xff\xff\xff\x10\x00\x00\x00" + b"\x01" * 40,
             b"\xff\xff\xff\xff\xff\xff\xff\x7f", bytes(300)]
    tails += [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 400))) for _ in range(40)]
    tails += [data[-k:] for k in (1, 16, 200)]  # a repeat of its own last bytes
    for tail in tails:
        path.write_bytes(data + tail)
        tbl = read_journal(path, RAW_EVENTS)
        _check_prefix(tbl, full, len(BATCH_ROWS))


def test_reader_keeps_a_killed_run_whose_journal_ends_in_garbage(killed_run):
    from conftest import KILLED_FLUSHES, SAMPLE_EVENTS
    from profiler.trace.reader import load_trace

    journal = killed_run / schema.journal_name("events")
    with open(journal, "ab") as f:
        f.write(bytes(range(256)) * 3)
    trace = load_trace(killed_run)
    assert len(trace.events) == KILLED_FLUSHES * len(SAMPLE_EVENTS)
    assert trace.events["category"].notna().all()


def test_journal_of_another_schema_is_a_tear_at_the_start(tmp_path):
    path = tmp_path / "events.journal"
    other = pa.table({"ts_us": pa.array([1, 2], pa.int32())})
    with ipc.new_stream(path, other.schema) as w:
        w.write_table(other)
    tbl = read_journal(path, RAW_EVENTS)
    assert tbl.num_rows == 0 and tbl.schema.equals(RAW_EVENTS)
    assert read_journal(path, None).equals(other)  # None: whatever the stream holds


@pytest.mark.parametrize("make", [lambda p: None, lambda p: p.mkdir(), lambda p: p.write_bytes(b""),
                                  lambda p: p.write_bytes(b"garbage" * 9)])
def test_unreadable_journal_is_empty_not_an_error(tmp_path, make):
    path = tmp_path / "events.journal"
    make(path)
    tbl = read_journal(path, RAW_EVENTS)
    assert tbl.num_rows == 0 and tbl.schema.equals(RAW_EVENTS)
    assert read_journal(path, None).num_rows == 0


def test_batches_that_do_not_combine_end_the_prefix(journal, monkeypatch):
    path, data, ends = journal
    real = journal_module._combined

    def combined(batches, sch):
        if len(batches) > 2:
            raise pa.ArrowCapacityError("too much to combine")
        return real(batches, sch)

    monkeypatch.setattr(journal_module, "_combined", combined)
    tbl = read_journal(path, RAW_EVENTS)
    assert tbl.num_rows == _prefix_rows(2)


# -- capture-time writing ---------------------------------------------------------------------
def test_no_fsync_and_atomic_meta(tmp_path, monkeypatch):
    def no_fsync(fd):
        raise AssertionError("fsync in the capture path")

    monkeypatch.setattr(os, "fsync", no_fsync)
    w = TraceWriter(tmp_path, "nofsync", base_meta(backend="cuda"))
    w.append("events", _events(0, 6))
    w.flush({"steps_completed": 1})
    names = sorted(p.name for p in w.run_dir.iterdir())
    assert names == ["events.journal", "meta.json"]  # no temporary left behind
    w.finalize("complete")
    assert not [p for p in w.run_dir.iterdir() if p.name.startswith(".")]


def test_append_columns(tmp_path):
    w = TraceWriter(tmp_path, "cols", base_meta())
    n = 4
    w.append("events", {"ts_us": (1, 2, 3, 4), "action": ("alloc",) * n, "addr": [7] * n,
                        "size_bytes": [512] * n, "step": [3] * n, "tag": None, "stack_id": None})
    w.append("steps", {"step": None, "ts_us": [5], "allocated_bytes": [0]})  # first column None
    w.flush()
    ev = read_journal(w.run_dir / schema.journal_name("events"), RAW_EVENTS)
    assert ev.column("step").to_pylist() == [3] * n and ev.column("addr").to_pylist() == [7] * n
    assert ev.column("stream").null_count == n and ev.column("tag").null_count == n
    steps = read_journal(w.run_dir / schema.journal_name("steps"), schema.TABLES["steps"])
    assert steps.num_rows == 1 and steps.column("step").null_count == 1
    with pytest.raises((OverflowError, pa.ArrowInvalid)):
        w.append("events", {"ts_us": [1, 2], "step": [1 << 40] * 2})  # int32, as before


# -- finalize: fast paths against the plain ones ------------------------------------------------
def _reference_block_sizes(actions, addrs, sizes, replay):
    """block_sizes as it was: one BlockReplay method call per event."""
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


def _state(r: BlockReplay):
    return ([(k, b.addr, b.size, b.segment, b.allocated) for k, b in r.blocks.items()],
            list(r.ends.items()), sorted(r.small_segments), list(r.segment_bytes.items()), r.misses)


SETTINGS = [None, {"expandable_segments": True}, {"max_split_size": 3 << 20},
            {"roundup_power2_divisions": {"1": 4, "2": 8}}]
ACTIONS = ["alloc", "free_requested", "free_completed", "segment_alloc", "segment_free",
           "segment_map", "segment_unmap", "oom"]


def _replay_case(rng: random.Random):
    """Random segments and a stream that mostly frees what it allocated, with some nonsense."""
    rules = AllocatorRules.from_settings(rng.choice(SETTINGS))
    segs, base = [], 0
    for _ in range(rng.randint(0, 4)):
        seg_bytes = rng.choice([2 << 20, 4 << 20, 20 << 20])
        kind = "small" if seg_bytes == 2 << 20 else "large"
        off = 0
        while off < seg_bytes:
            size = min(seg_bytes - off, rng.choice([512, 1024, 1 << 20, 3 << 20]))
            segs.append((base, seg_bytes, kind, base + off, size,
                         rng.choice(["inactive", "inactive", "active_allocated"])))
            off += size
        base += seg_bytes + (1 << 20)
    pool = [s[3] for s in segs] + [rng.randrange(0, base + (64 << 20), 512) for _ in range(20)]
    live, stream = [], []
    for _ in range(rng.randint(0, 400)):
        action = rng.choices(ACTIONS, [6, 2, 5, 1, 0.5, 0.5, 0.5, 0.2])[0]
        if action == "alloc":
            addr = rng.choice(pool)
            size = rng.choice([0, 1, 100, 512, 513, 4096, 1 << 20, (1 << 20) + 5, 3 << 20, 5 << 20])
            live.append((addr, size))
            pool.append(addr + rules.round_size(size))
        elif action in ("free_requested", "free_completed") and live and rng.random() < 0.8:
            addr, size = live.pop(rng.randrange(len(live)))
        else:
            addr, size = rng.choice(pool), rng.choice([512, 1 << 20, 2 << 20, 4 << 20])
        stream.append((action, addr, size))
    return rules, segs, stream


class _CountingReplay(BlockReplay):
    """The reference replay, counting which paths the cases take."""

    paths = {"alloc hit": 0, "split": 0, "free hit": 0, "merge": 0}

    def alloc(self, addr, requested):
        blocks_before, misses_before = len(self.blocks), self.misses
        size = super().alloc(addr, requested)
        self.paths["alloc hit"] += self.misses == misses_before
        self.paths["split"] += len(self.blocks) > blocks_before
        return size

    def free(self, addr, requested):
        blocks_before, misses_before = len(self.blocks), self.misses
        size = super().free(addr, requested)
        self.paths["free hit"] += self.misses == misses_before
        self.paths["merge"] += len(self.blocks) < blocks_before
        return size


def test_block_sizes_is_the_replay_methods_inlined():
    rng = random.Random(7)
    _CountingReplay.paths = dict.fromkeys(_CountingReplay.paths, 0)
    for _ in range(400):
        rules, segs, stream = _replay_case(rng)
        fast, slow = BlockReplay(rules), _CountingReplay(AllocatorRules(**vars(rules)))
        fast.load_segments(segs)
        slow.load_segments(segs)
        actions, addrs, sizes = (list(c) for c in zip(*stream)) if stream else ([], [], [])
        try:
            expected, error = _reference_block_sizes(actions, addrs, sizes, slow), None
        except Exception as exc:  # noqa: BLE001 - nonsense streams may fail; both must fail alike
            expected, error = None, type(exc)
        if error is None:
            assert blocks.block_sizes(actions, addrs, sizes, fast) == expected
            assert _state(fast) == _state(slow)
        else:
            with pytest.raises(error):
                blocks.block_sizes(actions, addrs, sizes, fast)
    assert min(_CountingReplay.paths.values()) > 200, _CountingReplay.paths  # every path is taken


def test_block_sizes_fails_where_the_replay_methods_fail():
    # A zero-byte block merges with itself: the methods raise KeyError, and so must the loop.
    segs = [(0x1000, 1024, "small", 0x1000, 0, "active_allocated")]
    for replay, sizes_of in ((BlockReplay(), blocks.block_sizes),
                             (BlockReplay(), _reference_block_sizes)):
        replay.load_segments(segs)
        with pytest.raises(KeyError):
            sizes_of(["free_completed"], [0x1000], [0], replay)


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
    "block_sizes": _reference_block_sizes,
}


def _synthetic_raw(tmp_path, backend: str, seed: int) -> tuple[dict, dict]:
    """Raw tables of a small synthetic capture, through the real journals."""
    rng = random.Random(seed)
    meta = base_meta(backend=backend)
    w = TraceWriter(tmp_path, f"synthetic-{backend}-{seed}", meta)
    seg_addrs = [0x10_0000 * (i + 1) for i in range(6)]
    if backend == "cuda":
        w.append("segments", {
            "snapshot": ["start"] * 6, "ts_us": [0] * 6, "event_index": [0] * 6,
            "segment_addr": seg_addrs, "segment_bytes": [2 << 20 if i % 2 else 20 << 20 for i in range(6)],
            "stream": [0] * 6, "segment_type": ["small" if i % 2 else "large" for i in range(6)],
            "is_expandable": [False] * 6, "block_addr": seg_addrs,
            "block_bytes": [2 << 20 if i % 2 else 20 << 20 for i in range(6)],
            "requested_bytes": [None] * 6, "state": ["inactive"] * 5 + ["active_allocated"],
        })
    phases = ["forward", "backward", "optimizer", "recompute", "eval", None]
    tags = [make_tag(rng.choice(phases), rng.choice([None, "enc", "enc.0", "dec.1"]),
                     rng.choice([None, None, "kv_cache", "bogus"])) for _ in range(25)]
    tags += [None, "", "#m:0:1", "a|b|c|d"]
    live: list[tuple[int, int]] = []
    ts = 0
    for step in range(6):
        cols = {k: [] for k in ("ts_us", "action", "addr", "size_bytes", "stream", "step", "tag",
                                "stack_id")}

        def add(action, addr, size, tag, stack):
            nonlocal ts
            ts += rng.randint(0, 5)
            for k, v in zip(cols, (ts, action, addr, size, 0, step, tag, stack)):
                cols[k].append(v)

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
        w.append("roles", {"ts_us": [ts], "event_index": [rng.randrange(1, 200)], "step": [step],
                           "addr": [rng.choice(live)[0] if live else seg_addrs[5]],
                           "size_bytes": [512], "role": [rng.choice(["parameter", "gradient",
                                                                     "optimizer_state", "buffer"])],
                           "name": [f"p{step}"]})
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
