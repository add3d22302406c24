"""The writer: journals that keep their whole batches however they were cut, and cheap
flushes. (Finalize's fast paths are checked in test_finalize_blocks.py and
test_finalize_tables.py.)
"""

from __future__ import annotations

import os
import random

import pyarrow as pa
import pyarrow.ipc as ipc
import pytest
from fakes import base_meta

from profiler.trace import journal as journal_module
from profiler.trace import schema
from profiler.trace.journal import read_journal
from profiler.trace.schema import RAW_EVENTS
from profiler.trace.tags import make_tag
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


@pytest.fixture(params=[False, True], ids=["here", "behind"])
def journal(tmp_path, request):
    """(path, bytes, batch ends): a killed run's events journal, its ends measured per flush;
    written by the flushing thread or by the writer's own (write_behind)."""
    w = TraceWriter(tmp_path, "journal", base_meta(), write_behind=request.param)
    path = w.run_dir / schema.journal_name("events")
    ends = []
    for b, n in enumerate(BATCH_ROWS):
        w.append("events", _events(b, n))
        w.flush({"steps_completed": b}, wait=True)
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
    tails = [
        b"\x00",
        b"\xff" * 4,
        b"\xff\xff\xff\xff\x10\x00\x00\x00" + b"\x01" * 40,
        b"\xff\xff\xff\xff\xff\xff\xff\x7f",
        bytes(300),
    ]
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


@pytest.mark.parametrize(
    "make", [lambda p: None, lambda p: p.mkdir(), lambda p: p.write_bytes(b""), lambda p: p.write_bytes(b"garbage" * 9)]
)
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
    w.append(
        "events",
        {
            "ts_us": (1, 2, 3, 4),
            "action": ("alloc",) * n,
            "addr": [7] * n,
            "size_bytes": [512] * n,
            "step": [3] * n,
            "tag": None,
            "stack_id": None,
        },
    )
    w.append("steps", {"step": None, "ts_us": [5], "allocated_bytes": [0]})  # first column None
    w.flush()
    ev = read_journal(w.run_dir / schema.journal_name("events"), RAW_EVENTS)
    assert ev.column("step").to_pylist() == [3] * n and ev.column("addr").to_pylist() == [7] * n
    assert ev.column("stream").null_count == n and ev.column("tag").null_count == n
    steps = read_journal(w.run_dir / schema.journal_name("steps"), schema.TABLES["steps"])
    assert steps.num_rows == 1 and steps.column("step").null_count == 1
    with pytest.raises((OverflowError, pa.ArrowInvalid)):
        w.append("events", {"ts_us": [1, 2], "step": [1 << 40] * 2})  # int32, as before


def test_an_abandoned_writer_keeps_its_journals_as_they_are(tmp_path):
    w = TraceWriter(tmp_path, "abandoned", base_meta())
    w.append("events", _events(0, 5))
    w.flush()
    w.abandon()  # a capture that failed: nothing more reaches its journals
    path = w.run_dir / schema.journal_name("events")
    size = path.stat().st_size
    w.append("events", _events(1, 7))
    w.flush()
    assert path.stat().st_size == size
    assert read_journal(path, RAW_EVENTS).num_rows == 5


# -- write-behind -------------------------------------------------------------------------------
@pytest.fixture
def slow_writes(monkeypatch):
    """Journal writes that wait for `gate` (a threading.Event) to open."""
    import threading

    gate = threading.Event()
    write = journal_module.JournalWriter.write

    def gated(self, batches):
        assert gate.wait(30)
        write(self, batches)

    monkeypatch.setattr(journal_module.JournalWriter, "write", gated)
    return gate


def test_write_behind_flushes_return_before_the_write_and_keep_its_order(tmp_path, slow_writes):
    w = TraceWriter(tmp_path, "behind", base_meta(), write_behind=True)
    for b, n in enumerate(BATCH_ROWS[:3]):
        w.append("events", _events(b, n))
        w.flush()  # returns while the first write waits at the gate
    path = w.run_dir / schema.journal_name("events")
    assert not path.exists() or read_journal(path, RAW_EVENTS).num_rows == 0
    slow_writes.set()
    w.flush(wait=True)
    tbl = read_journal(path, RAW_EVENTS)
    assert tbl.column("step").to_pylist() == [b for b, n in enumerate(BATCH_ROWS[:3]) for _ in range(n)]
    w.finalize("complete")
    assert w.rows_written["events"] == sum(BATCH_ROWS[:3])


def test_write_behind_writes_the_live_meta_after_its_rows_and_before_a_later_meta(tmp_path, slow_writes):
    """The live meta.json goes to the writing thread with the rows it describes; a meta.json
    written directly after it (update_meta) waits for it, so the later one is what stays."""
    import json
    import threading

    w = TraceWriter(tmp_path, "behind-meta", base_meta(), write_behind=True)
    meta = w.run_dir / schema.META_FILE
    w.append("events", _events(0, 3))
    w.flush({"steps_completed": 1})  # returns while the rows' write waits at the gate
    assert "steps_completed" not in json.loads(meta.read_text())
    threading.Timer(0.2, slow_writes.set).start()
    w.update_meta({"framework_steps": {"0": 0}})
    on_disk = json.loads(meta.read_text())
    assert on_disk["steps_completed"] == 1 and on_disk["framework_steps"] == {"0": 0}
    assert read_journal(w.run_dir / schema.journal_name("events"), RAW_EVENTS).num_rows == 3
    w.finalize("complete")


def test_after_a_write_behind_error_nothing_more_is_written(tmp_path, monkeypatch):
    import errno

    w = TraceWriter(tmp_path, "behind-full", base_meta(), write_behind=True)
    w.append("events", _events(0, 5))
    w.flush(wait=True)
    write = journal_module.JournalWriter.write

    def full_disk(self, batches):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(journal_module.JournalWriter, "write", full_disk)
    w.append("events", _events(1, 7))
    with pytest.raises(OSError, match="No space left"):
        w.flush(wait=True)
    monkeypatch.setattr(journal_module.JournalWriter, "write", write)  # the disk has room again
    # As a failed capture does (profiler.capture.failure.stop): flush, abandon, then finalize.
    w.append("events", _events(2, 3))
    w.flush()
    w.abandon()
    path = w.run_dir / schema.journal_name("events")
    assert read_journal(path, RAW_EVENTS).num_rows == 5
    w.finalize("capture_failed")  # no thread left to wait for: it neither hangs nor writes
    assert w.finalized


def test_finalize_raises_a_write_behind_error_left_unseen(tmp_path, monkeypatch):
    w = TraceWriter(tmp_path, "behind-late", base_meta(), write_behind=True)

    def broken(self, batches):
        raise OSError("the disk went away")

    monkeypatch.setattr(journal_module.JournalWriter, "write", broken)
    w.append("events", _events(0, 5))
    w.flush()
    with pytest.raises(OSError, match="went away"):
        w.finalize("complete")


def test_rows_as_dicts_become_the_same_batches_as_columns(tmp_path):
    """append_rows: dicts in one conversion; a lone surrogate or a missing column as append has them."""
    a = TraceWriter(tmp_path, "rows", base_meta())
    b = TraceWriter(tmp_path, "columns", base_meta())
    rows = [dict(step=0, phase="forward", ts_us_start=1, ts_us_end=2), dict(step=1, phase="mine\udcff", ts_us_start=3)]
    a.append_rows("phases", rows)
    a.append_rows("phases", rows[:1])
    b.append("phases", {k: [r.get(k) for r in rows] for k in rows[0]})
    b.append("phases", {k: [rows[0][k]] for k in rows[0]})
    assert a._pending["phases"][0].equals(b._pending["phases"][0])
    assert a._pending["phases"][1].equals(b._pending["phases"][1])
    assert a._pending["phases"][0].column("ts_us_end").to_pylist() == [2, None]
