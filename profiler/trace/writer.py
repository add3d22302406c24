"""Writes one run directory: journals while capturing, Parquet once finalized.

Crash safety comes from the layout, not from luck:
- every table is appended to `<table>.journal`, an Arrow IPC stream, one
  record batch per flush (profiler.trace.journal); a process killed mid-write
  leaves a prefix of whole batches that the reader can still use;
- `meta.json` and every Parquet file are written under a temporary name and
  renamed into place (profiler.trace.files), so a final name never points at a
  half-written file;
- a journal is only deleted after its Parquet file has been renamed into place.

The contract is a killed process (SIGKILL, the OOM killer, a crash), not power
loss: what reached the OS survives the process, so nothing is fsync'ed. The
profiled process flushes as often as every step, and an fsync would put a disk
round trip (milliseconds on many disks, more on network file systems) into it.

A writer made with `write_behind` hands each flush to a thread of its own, which
writes the flushes in order while the profiled thread goes on: compressing a drain
of tens of thousands of events takes milliseconds (about 100 ns an event with lz4),
and so can the rename of a live meta.json, which goes with the flush it came with.
On disk there is then always a prefix of the flushes, as a kill between two tables'
writes leaves anyway; a kill loses the flushes still queued (at most
write_behind.QUEUED). A write's error is raised by the next flush, or by finalize.

Imports only numpy and pyarrow: this runs inside the profiled process.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from profiler.errors import RunDirectoryExists, VramscopeError
from profiler.trace import schema
from profiler.trace.files import atomic_path, atomic_write
from profiler.trace.finalize.tables import finalize_tables
from profiler.trace.journal import JournalWriter, read_journal
from profiler.trace.write_behind import WriteBehind
from profiler.units import human_bytes

# Finalizing holds every table whole, with the copies that pairing and classifying make:
# about 290 bytes per event at its peak (a CPU capture of 3M events, torch 2.13). A run
# that would take more than FINALIZE_MEMORY_SHARE of the memory the machine has free is
# left as journals, which readers turn into tables in their own process, rather than have
# the profiled process killed by the OOM killer as it leaves the capture.
FINALIZE_BYTES_PER_EVENT = 320
FINALIZE_MEMORY_SHARE = 0.75


class TooLargeToFinalize(VramscopeError, MemoryError):
    """The run's tables would not fit in the memory free now (`vramscope import`: one line, exit 1)."""

    exit_code = 1


def write_meta(run_dir: Path, meta: dict) -> None:
    atomic_write(run_dir / schema.META_FILE, _meta_text(meta))


def _meta_text(meta: dict) -> str:
    return json.dumps(meta, indent=1, sort_keys=True, default=str)


def write_parquet(path: Path, table: pa.Table) -> None:
    """Parquet with settings chosen for allocator events (see bench/writer.py)."""
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, **parquet_options(table.schema))


def parquet_options(table_schema: pa.Schema) -> dict:
    # Timestamps grow monotonically: delta encoding beats dictionaries there.
    delta = [n for n in ("ts_us",) if n in table_schema.names]
    dict_cols = [n for n in table_schema.names if n not in delta]
    return dict(
        compression="zstd",
        compression_level=3,
        use_dictionary=dict_cols,
        column_encoding={n: "DELTA_BINARY_PACKED" for n in delta},
        row_group_size=1 << 20,
        write_statistics=["ts_us", "step"] if "step" in table_schema.names else True,
    )


def run_slug(name: str) -> str:
    """`name` as a directory-name prefix."""
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in name)[:48] or "run"


def new_run_id(name: str) -> str:
    slug = run_slug(name)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return f"{slug}-{stamp}-{secrets.token_hex(3)}"


def _new_run_dir(out_dir: Path, name: str, run_id: str | None, subdir: str | None) -> tuple[str, Path]:
    """(run id, directory) of a run directory made now, never one that exists: two captures
    writing one directory would leave a trace of neither. `subdir` is one partition of a
    multi-rank run ("rank=3"), whose run directory the other ranks share."""
    while True:
        chosen = run_id or new_run_id(name)
        run_dir = out_dir / chosen / subdir if subdir else out_dir / chosen
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        try:
            run_dir.mkdir()
            return chosen, run_dir
        except FileExistsError:
            if run_id is None:
                continue  # a fresh id met another run's: draw again
            raise RunDirectoryExists(
                f"{run_dir} exists already: a capture writes only a new run directory "
                "(give another run id, or another --out)"
            ) from None


class TraceWriter:
    """Owns a run directory for the duration of one capture."""

    def __init__(
        self,
        out_dir: str | os.PathLike,
        name: str,
        meta: dict,
        run_id: str | None = None,
        subdir: str | None = None,
        write_behind: bool = False,
    ):
        """`write_behind`: a thread of the writer's own writes the journals (module doc)."""
        self.run_id, self.run_dir = _new_run_dir(Path(out_dir), name, run_id, subdir)
        self.meta = dict(meta)
        self.meta.update(
            format=schema.FORMAT_NAME,
            schema_version=schema.SCHEMA_VERSION,
            run_id=self.run_id,
            name=name,
            pid=os.getpid(),
            hostname=socket.gethostname(),
            started_at=time.time(),
        )
        self.meta.pop("status", None)  # absent while running
        write_meta(self.run_dir, self.meta)
        self._schemas = dict(schema.JOURNALS)
        self._pending: dict[str, list[pa.RecordBatch]] = {t: [] for t in self._schemas}
        self._journals: dict[str, JournalWriter] = {}
        self._abandoned = False  # abandon(): no more rows
        self._behind = WriteBehind() if write_behind else None
        self._published: set[str] = set()  # tables publish() wrote
        self.rows_written: dict[str, int] = dict.fromkeys(self._schemas, 0)  # journal rows, by table
        self.finalized = False

    # -- capture-time -----------------------------------------------------------------
    def append(self, table: str, columns: dict) -> None:
        """Queue rows given as {column: sequence}; they reach disk at the next flush()."""
        if self._abandoned:
            return  # a new journal would replace the one the failed capture left
        batch = _record_batch(self._schemas[table], columns)
        if batch is not None:
            self._pending[table].append(batch)

    def append_rows(self, table: str, rows: list[dict]) -> None:
        """Queue rows given as dicts (a column missing from one is null there)."""
        if self._abandoned or not rows:
            return
        try:  # in one call: per column, a conversion costs several microseconds
            batch = pa.RecordBatch.from_pylist(rows, schema=self._schemas[table])
        except (UnicodeEncodeError, pa.ArrowException):  # a lone surrogate, or not the schema's types
            sch = self._schemas[table]
            batch = _record_batch(sch, {f.name: [r.get(f.name) for r in rows] for f in sch})
        if batch is not None:
            self._pending[table].append(batch)

    def publish(self, table: str, parts: Iterable[dict]) -> None:
        """Write a table's Parquet file now, one part ({column: sequence}) at a time, instead
        of through its journal at finalize, which holds every table whole at once: for a table
        that is large and complete before the others (an imported snapshot's stacks). finalize
        then leaves that file as it is."""
        sch = schema.TABLES[table]
        options = parquet_options(sch)
        options.pop("row_group_size")
        with (
            atomic_path(self.run_dir / schema.parquet_name(table)) as tmp,
            pq.ParquetWriter(tmp, sch, **options) as out,
        ):
            for columns in parts:
                batch = _record_batch(sch, columns)
                if batch is not None:
                    out.write_batch(batch)
        self._published.add(table)

    def flush(self, meta_updates: dict | None = None, wait: bool = False) -> None:
        """Write the queued rows to the journals, and `meta_updates` to meta.json; with
        write_behind, hand both to the writing thread (`wait`: until they are written)."""
        # Taken off the queue first: a flush cut short (a signal's exception, a full disk)
        # must not write the same rows again at the next one.
        taken = [(table, batches[:]) for table, batches in self._pending.items() if batches]
        for batches in self._pending.values():
            batches.clear()
        meta_text = None
        if meta_updates:
            self.meta.update(meta_updates)
            meta_text = _meta_text(self.meta)  # as it is now: the capture goes on changing it
        behind = self._behind
        if behind is not None and behind.pid == os.getpid():
            # meta.json's rename costs milliseconds on some filesystems: the thread pays it too.
            if taken or meta_text is not None:
                behind.submit(lambda: self._write(taken, meta_text))
            if wait:
                behind.wait()
        else:  # written here (a forked child has no writing thread)
            self._write(taken, meta_text)

    def _write(self, taken: list[tuple[str, list[pa.RecordBatch]]], meta_text: str | None = None) -> None:
        for table, batches in taken:
            self._journal(table).write(batches)
            self.rows_written[table] += sum(b.num_rows for b in batches)
        if meta_text is not None:
            atomic_write(self.run_dir / schema.META_FILE, meta_text)

    def update_meta(self, updates: dict) -> None:
        """Add `updates` to meta.json now, journals aside."""
        self.meta.update(updates)
        behind = self._behind
        if behind is not None and behind.pid == os.getpid():
            behind.wait(raise_error=False)  # a live meta.json still queued must not land after this one
        write_meta(self.run_dir, self.meta)

    def _journal(self, table: str) -> JournalWriter:
        journal = self._journals.get(table)
        if journal is None:
            journal = JournalWriter(self.run_dir / schema.journal_name(table), self._schemas[table])
            self._journals[table] = journal
        return journal

    def abandon(self) -> None:
        """Write no more journal batches: drop the queued rows and close each journal as it
        stands (after a failed write, its readable prefix is what a reader keeps)."""
        self._abandoned = True
        for batches in self._pending.values():
            batches.clear()
        behind, self._behind = self._behind, None
        if behind is not None:
            behind.stop(drop_queued=True)
        journals, self._journals = self._journals, {}
        for journal in journals.values():
            with contextlib.suppress(Exception):
                journal.close()

    # -- end of capture ---------------------------------------------------------------
    def finalize(self, status: str, meta_updates: dict | None = None) -> Path:
        """Turn journals into Parquet, then write the final meta with its status."""
        if self.finalized:
            return self.run_dir
        self.flush()
        behind, self._behind = self._behind, None
        if behind is not None:
            behind.stop()  # every flush written, or the first write's error raised
        for journal in self._journals.values():
            journal.close()
        self.meta.update(meta_updates or {})  # the final facts, kept beside the journals if finalizing fails
        check_memory_for(self.rows_written["events"], self.run_dir)
        raw = {t: read_journal(self.run_dir / schema.journal_name(t), s) for t, s in self._schemas.items()}
        facts: dict = {}
        # The final facts (steps_completed) decide which steps get phase spans; the live
        # meta.json may lag them by a drain interval.
        final = finalize_tables(raw, self.meta, facts)
        for table, tbl in final.items():
            if table in self._published:
                continue
            write_parquet(self.run_dir / schema.parquet_name(table), tbl)
        for table in self._schemas:
            (self.run_dir / schema.journal_name(table)).unlink(missing_ok=True)
        self.meta.update(facts)
        self.meta.update(status=status, ended_at=time.time(), event_count=final["events"].num_rows)
        write_meta(self.run_dir, self.meta)
        self.finalized = True
        return self.run_dir


def check_memory_for(events: int, run_dir: Path | None = None) -> None:
    """Raise TooLargeToFinalize if finalizing `events` events would not fit in free memory."""
    free = available_memory_bytes()
    need = events * FINALIZE_BYTES_PER_EVENT
    if free is not None and need > free * FINALIZE_MEMORY_SHARE:
        raise TooLargeToFinalize(
            f"finalizing {events:,} events needs about {human_bytes(need)}, and {human_bytes(free)} are free; "
            f"readers build its tables from the journals{f' in {run_dir}' if run_dir is not None else ''}"
        )


def available_memory_bytes() -> int | None:
    """The memory the kernel says can be had without swapping (Linux's MemAvailable); None elsewhere."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _record_batch(sch: pa.Schema, columns: dict) -> pa.RecordBatch | None:
    """A batch of `columns` ({column: sequence}; a missing column is nulls, keys that are no
    column are left out), None if no rows."""
    n = next((len(columns[f.name]) for f in sch if columns.get(f.name) is not None), 0)
    if not n:
        return None
    arrays = []
    for field in sch:
        values = columns.get(field.name)
        arrays.append(pa.nulls(n, field.type) if values is None else _to_arrow(values, field.type))
    return pa.RecordBatch.from_arrays(arrays, schema=sch)


def _to_arrow(values, type_: pa.DataType) -> pa.Array:
    try:
        return _to_arrow_as_given(values, type_)
    except UnicodeEncodeError:  # a lone surrogate (a file name, an imported snapshot's metadata)
        return _to_arrow_as_given([_utf8(v) for v in values], type_)


def _utf8(value):
    """`value` with characters UTF-8 cannot hold (lone surrogates) written as escapes."""
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, (list, tuple)):
        return [_utf8(v) for v in value]
    return value


def _to_arrow_as_given(values, type_: pa.DataType) -> pa.Array:
    if isinstance(values, pa.Array):
        return values if values.type == type_ else values.cast(type_)
    if pa.types.is_dictionary(type_):
        # Encoded while converting: cheaper than making strings, then dictionary_encode.
        return pa.array(values, type_)
    if (
        type(values) in (list, tuple)
        and values
        and type(values[0]) is int
        and pa.types.is_integer(type_)
        and values[0] == values[-1]
        and values.count(values[0]) == len(values)
    ):  # one value: the step, the stream
        return pa.array(np.full(len(values), values[0], dtype=type_.to_pandas_dtype()))
    return pa.array(values, type_)
