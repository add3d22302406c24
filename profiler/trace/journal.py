"""The journal: one Arrow IPC stream per table, appended to while a capture runs.

Each flush appends whole record batches and hands them to the OS in one write, so
a process killed at any moment leaves a journal whose batches are all whole but
perhaps the last. read_journal() keeps every batch before the first one it cannot
read: a torn tail, flipped bytes, appended garbage or a batch of another schema
end the readable prefix, and never raise.

Imports only pyarrow: the writer runs inside the profiled process.
"""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.ipc as ipc

# lz4 frames: writing a 3000-event batch takes ~0.2 ms, zstd ~0.5 ms (for 7 rather than
# 14 bytes an event; journals are deleted at finalize, so their size matters little).
# No threads: for batches this small, handing buffers to the pool costs more than it saves.
_IPC_OPTIONS = ipc.IpcWriteOptions(compression="lz4", use_threads=False)
_JOURNAL_BUFFER = 1 << 20  # a flush reaches the OS in one write

# What reading corrupt or torn IPC bytes can raise; any of them ends the readable prefix.
_TEAR_ERRORS = (
    pa.ArrowException,
    OSError,
    EOFError,
    MemoryError,
    ValueError,
    TypeError,
    IndexError,
    KeyError,
    OverflowError,
)


class JournalWriter:
    """Appends record batches of one schema to a new journal file."""

    def __init__(self, path: str | os.PathLike, sch: pa.Schema):
        self._file = pa.BufferedOutputStream(pa.OSFile(str(path), "wb"), _JOURNAL_BUFFER)
        self._stream = ipc.new_stream(self._file, sch, options=_IPC_OPTIONS)

    def write(self, batches: list[pa.RecordBatch]) -> None:
        """Append `batches` and pass them to the OS (no fsync: see profiler.trace.files)."""
        for batch in batches:
            self._stream.write_batch(batch)
        self._file.flush()

    def close(self) -> None:
        self._stream.close()
        self._file.close()


def read_journal(path: str | os.PathLike, sch: pa.Schema | None) -> pa.Table:
    """Every whole, valid batch of a journal, as one table of schema `sch`.

    A journal ends where it stops being readable: a torn last batch (the process
    was killed mid-write), flipped bytes, appended garbage or a batch of another
    schema. Everything before that point is kept; nothing here raises for bad
    bytes. `sch=None` takes the stream's own schema, whatever it is.
    """
    empty = sch.empty_table() if sch is not None else pa.table({})
    try:
        # Read whole: a corrupt length field then reads short instead of allocating.
        data = Path(path).read_bytes()
    except _TEAR_ERRORS:  # missing, a directory, unreadable
        return empty
    batches: list[pa.RecordBatch] = []
    try:
        reader = ipc.open_stream(pa.BufferReader(data))
        if sch is None:
            sch = reader.schema
        elif not reader.schema.equals(sch):
            return empty  # a journal of another schema: not one row of it is ours
        _read_batches(reader, sch, batches)
    except _TEAR_ERRORS:
        pass  # keep what was read before the tear
    if sch is None:  # not even a schema could be read
        return empty
    return _combine(batches, sch)


def _read_batches(reader: ipc.RecordBatchStreamReader, sch: pa.Schema, into: list[pa.RecordBatch]) -> None:
    """Append the stream's valid batches of schema `sch` to `into`, up to the first that is not."""
    while True:
        try:
            batch = reader.read_next_batch()
        except StopIteration:
            return
        batch.validate(full=True)
        if not batch.schema.equals(sch):
            return
        into.append(batch)


def _combine(batches: list[pa.RecordBatch], sch: pa.Schema) -> pa.Table:
    """One chunk per column and one dictionary each: the longest prefix of batches that combines."""
    try:
        return _combined(batches, sch)
    except _TEAR_ERRORS:  # say, more than 2 GiB of strings in one column
        pass
    best, lo, hi = sch.empty_table(), 0, len(batches)  # batches[:lo] combine, [:hi] do not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        try:
            best, lo = _combined(batches[:mid], sch), mid
        except _TEAR_ERRORS:
            hi = mid
    return best


def _combined(batches: list[pa.RecordBatch], sch: pa.Schema) -> pa.Table:
    if not batches:
        return sch.empty_table()
    return pa.Table.from_batches(batches, schema=sch).unify_dictionaries().combine_chunks()
