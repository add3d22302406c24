"""Writes one run directory: journals while capturing, Parquet once finalized.

Crash safety comes from the layout, not from luck:
- every table is appended to `<table>.journal`, an Arrow IPC stream, one
  record batch per flush; a process killed mid-write leaves a prefix of whole
  batches that the reader can still use;
- `meta.json` and every Parquet file are written under a temporary name and
  renamed into place, so a final name never points at a half-written file;
- a journal is only deleted after its Parquet file has been renamed into place.

Imports only numpy and pyarrow: this runs inside the profiled process.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from profiler import schema
from profiler.tables import RAW_EVENTS, finalize_tables

_IPC_OPTIONS = ipc.IpcWriteOptions(compression="zstd")


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_meta(run_dir: Path, meta: dict) -> None:
    data = json.dumps(meta, indent=1, sort_keys=True, default=str).encode()
    _atomic_write_bytes(run_dir / schema.META_FILE, data)


def write_parquet(path: Path, table: pa.Table) -> None:
    """Parquet with settings chosen for allocator events (see bench/writer.py)."""
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp, **parquet_options(table.schema))
    os.replace(tmp, path)


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


def new_run_id(name: str) -> str:
    slug = "".join(c if c.isalnum() or c in "-_" else "-" for c in name)[:48] or "run"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return f"{slug}-{stamp}-{secrets.token_hex(3)}"


class TraceWriter:
    """Owns a run directory for the duration of one capture."""

    def __init__(self, out_dir: str | os.PathLike, name: str, meta: dict,
                 run_id: str | None = None, subdir: str | None = None):
        self.run_id = run_id or new_run_id(name)
        self.run_dir = Path(out_dir) / self.run_id
        if subdir:  # one partition of a multi-rank run, e.g. "rank=3"
            self.run_dir = self.run_dir / subdir
        self.run_dir.mkdir(parents=True, exist_ok=True)
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
        self._schemas = {t: s for t, s in schema.TABLES.items()}
        self._schemas["events"] = RAW_EVENTS
        self._pending: dict[str, list[pa.RecordBatch]] = {t: [] for t in self._schemas}
        self._journals: dict[str, ipc.RecordBatchStreamWriter] = {}
        self._files: dict[str, object] = {}
        self.finalized = False

    # -- capture-time -----------------------------------------------------------------
    def append(self, table: str, columns: dict) -> None:
        """Queue rows given as {column: sequence}; they reach disk at the next flush()."""
        sch = self._schemas[table]
        arrays = []
        n = None
        for field in sch:
            values = columns.get(field.name)
            if values is None:
                n = n if n is not None else len(next(iter(columns.values())))
                arrays.append(pa.nulls(n, field.type))
                continue
            arrays.append(_to_arrow(values, field.type))
            n = len(arrays[-1])
        if n:
            self._pending[table].append(pa.RecordBatch.from_arrays(arrays, schema=sch))

    def flush(self, meta_updates: dict | None = None) -> None:
        for table, batches in self._pending.items():
            if not batches:
                continue
            writer = self._journal(table)
            for b in batches:
                writer.write_batch(b)
            self._files[table].flush()
            batches.clear()
        if meta_updates:
            self.meta.update(meta_updates)
            write_meta(self.run_dir, self.meta)

    def _journal(self, table: str) -> ipc.RecordBatchStreamWriter:
        w = self._journals.get(table)
        if w is None:
            f = open(self.run_dir / schema.journal_name(table), "wb")
            w = ipc.new_stream(f, self._schemas[table], options=_IPC_OPTIONS)
            self._files[table] = f
            self._journals[table] = w
        return w

    # -- end of capture ---------------------------------------------------------------
    def finalize(self, status: str, meta_updates: dict | None = None) -> Path:
        """Turn journals into Parquet, then write the final meta with its status."""
        if self.finalized:
            return self.run_dir
        self.flush()
        for table, w in self._journals.items():
            w.close()
            self._files[table].close()
        raw = {t: _read_journal(self.run_dir / schema.journal_name(t), s)
               for t, s in self._schemas.items()}
        facts: dict = {}
        final = finalize_tables(raw, self.meta, facts)
        for table, tbl in final.items():
            write_parquet(self.run_dir / schema.parquet_name(table), tbl)
        for table in self._schemas:
            (self.run_dir / schema.journal_name(table)).unlink(missing_ok=True)
        self.meta.update(meta_updates or {})
        self.meta.update(facts)
        self.meta.update(status=status, ended_at=time.time(),
                         event_count=final["events"].num_rows)
        write_meta(self.run_dir, self.meta)
        self.finalized = True
        return self.run_dir


def _to_arrow(values, type_: pa.DataType) -> pa.Array:
    if isinstance(values, pa.Array):
        return values if values.type == type_ else values.cast(type_)
    if pa.types.is_dictionary(type_):
        return pa.array(values, pa.string()).dictionary_encode().cast(type_)
    return pa.array(values, type_)


def _read_journal(path: Path, sch: pa.Schema) -> pa.Table:
    """Every whole batch of a journal; a torn last batch is dropped, not fatal."""
    if not path.exists():
        return sch.empty_table()
    batches = []
    try:
        with open(path, "rb") as f:
            reader = ipc.open_stream(f)
            while True:
                try:
                    batches.append(reader.read_next_batch())
                except StopIteration:
                    break
    except (pa.ArrowInvalid, pa.ArrowIOError, OSError, EOFError):
        pass  # keep what was read before the tear
    if not batches:
        return sch.empty_table()
    return pa.Table.from_batches(batches).unify_dictionaries().combine_chunks()


read_journal = _read_journal
