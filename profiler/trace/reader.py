"""Reads a run directory into a Trace.

A trace on disk is input we do not control: a killed process, a full disk, a
copy cut short or a file from another tool. Every way of being wrong ends in a
TraceError with one line naming the run and the problem, never a traceback
(profiler.trace.problems). What each table must hold comes from
profiler.trace.schema.COLUMNS; meta.json is read by profiler.trace.meta.read_meta.
Nothing here writes to the run directory. Finding the runs under a folder, and loading
each of them (iter_runs, load_runs), is profiler.trace.layout's.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from profiler.errors import EmptyTraceError, UsageError
from profiler.trace import schema
from profiler.trace.finalize.tables import finalize_tables
from profiler.trace.journal import read_journal
from profiler.trace.meta import read_meta
from profiler.trace.model import Trace
from profiler.trace.problems import check_regular, reading, trace_error

# finalize_tables derives events and segments categories from these raw tables.
_CLASSIFY_INPUTS = ("events", "roles", "segments", "frames", "stacks")  # stacks: sites.py


# -- tables ---------------------------------------------------------------------------
def _wanted(tables: Iterable[str] | None) -> tuple[str, ...]:
    if tables is None:
        return schema.TABLE_NAMES
    if isinstance(tables, str):
        tables = (tables,)
    wanted = tuple(tables)
    unknown = [t for t in wanted if t not in schema.TABLES]
    if unknown:
        raise UsageError(
            f"unknown trace table(s): {', '.join(map(str, unknown))}; tables are {', '.join(schema.TABLE_NAMES)}"
        )
    return tuple(t for t in schema.TABLE_NAMES if t in wanted)  # schema order, no repeats


def _read_parquet(run: Path, table: str) -> pa.Table:
    name = schema.parquet_name(table)
    target = schema.TABLES[table]
    check_regular(run, name)
    with reading(run, name):
        with pq.ParquetFile(run / name) as pf:
            present = pf.schema_arrow.names
            _require(run, name, table, present, schema.REQUIRED_COLUMNS[table])
            # Extra columns from a newer or foreign writer are never decoded.
            tbl = pf.read(columns=[f.name for f in target if f.name in present])
        tbl.validate(full=True)  # no page checksums: catch garbage before pandas sees it
    return _conform(run, name, tbl, target)


def _read_journals(run: Path, tables: tuple[str, ...], meta: dict) -> dict[str, pa.Table]:
    """Published tables rebuilt from the journals of an unfinished run."""
    needs_classify = any(t in ("events", "segments") for t in tables)
    to_read = set(tables) | (set(_CLASSIFY_INPUTS) if needs_classify else set())
    raw = {}
    for table in schema.TABLE_NAMES:
        raw[table] = _read_raw(run, table) if table in to_read else schema.empty_journal(table)
    with reading(run, "rebuilding tables from journals"):
        # meta tells finalize the backend and allocator settings that block sizes depend on.
        published = finalize_tables(raw, meta)
    return {t: published[t] for t in tables}


def _read_raw(run: Path, table: str) -> pa.Table:
    name = schema.journal_name(table)
    target = schema.JOURNALS[table]
    required = schema.JOURNAL_REQUIRED_COLUMNS[table]
    if os.path.lexists(run / name):
        check_regular(run, name)
    with reading(run, name):
        # A torn last batch is dropped by read_journal: a killed run keeps its whole batches. The
        # stream's own schema is read, so that a column of another type is cast or refused below,
        # never the whole journal dropped as foreign.
        tbl = read_journal(run / name, None)
        tbl.validate(full=True)
    if tbl.num_rows == 0:
        return target.empty_table()  # an empty journal may carry any schema
    _require(run, name, table, tbl.column_names, required)
    return _conform(run, name, tbl, target)


def _require(run: Path, source: str, table: str, present, required) -> None:
    missing = [c for c in required if c not in present]
    if missing:
        raise trace_error(run, f"{source}: table {table} lacks required column(s) {', '.join(missing)}")


def _conform(run: Path, source: str, tbl: pa.Table, target: pa.Schema) -> pa.Table:
    """The table with exactly the target's columns and types; optional columns become nulls."""
    arrays = []
    for field in target:
        found = tbl.schema.get_all_field_indices(field.name)
        if len(found) > 1:
            raise trace_error(run, f"{source}: column {field.name} appears {len(found)} times")
        if not found:
            arrays.append(pa.nulls(tbl.num_rows, field.type))
            continue
        arrays.append(_cast(run, source, field, tbl.column(found[0])))
    return pa.Table.from_arrays(arrays, schema=target)


def _cast(run: Path, source: str, field: pa.Field, column: pa.ChunkedArray) -> pa.ChunkedArray:
    have = column.type
    if have == field.type:
        return column
    if not _same_kind(have, field.type):
        raise trace_error(run, f"{source}: column {field.name} has type {have}, expected {field.type}")
    try:
        return column.cast(field.type)  # safe: overflow or fractions fail here
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
        raise trace_error(
            run, f"{source}: column {field.name} of type {have} does not fit {field.type}: {exc}"
        ) from None


def _same_kind(have: pa.DataType, want: pa.DataType) -> bool:
    """Whether a value of `have` means the same thing as `want`: no parsing strings into numbers."""
    t = pa.types
    if t.is_null(have):
        return True
    if t.is_dictionary(have):
        return (t.is_dictionary(want) or t.is_string(want)) and _same_kind(have.value_type, pa.string())
    if t.is_integer(want):
        return t.is_integer(have) or t.is_floating(have)
    if t.is_dictionary(want) or t.is_string(want):
        return t.is_string(have) or t.is_large_string(have)
    if t.is_boolean(want):
        return t.is_boolean(have)
    if t.is_list(want):
        return (t.is_list(have) or t.is_large_list(have)) and _same_kind(have.value_type, want.value_type)
    return False


def _check_values(run: Path, table: str, tbl: pa.Table) -> None:
    """The value checks schema.COLUMNS asks of `table` (NOT_NULL, NON_NEGATIVE, NON_DECREASING)."""
    for column in schema.NOT_NULL.get(table, ()):
        nulls = tbl.column(column).null_count
        if nulls:
            raise trace_error(run, f"table {table}: column {column} has {nulls} null value(s)")
    for column in schema.NON_NEGATIVE.get(table, ()):
        low = pc.min(tbl.column(column)).as_py()
        if low is not None and low < 0:
            raise trace_error(run, f"table {table}: column {column} has a negative value ({low})")
    for column in schema.NON_DECREASING.get(table, ()):
        if tbl.num_rows < 2:
            continue
        values = tbl.column(column).to_numpy()  # never null: NOT_NULL was checked first
        back = np.flatnonzero(np.diff(values.astype(np.int64)) < 0)
        if len(back):
            i = int(back[0]) + 1
            raise trace_error(
                run,
                f"table {table}: {column} numbers go backwards at row {i} ({int(values[i - 1])} then {int(values[i])})",
            )


def _row_count(run: Path, table: str, finished: bool) -> int:
    """Rows in a table that the caller did not ask for: only its metadata is read."""
    path = run / schema.parquet_name(table)
    if os.path.lexists(path):
        check_regular(run, path.name)
        with reading(run, path.name), pq.ParquetFile(path) as pf:
            return pf.metadata.num_rows
    if finished:
        raise trace_error(run, f"{path.name} is missing")
    if os.path.lexists(run / schema.journal_name(table)):
        check_regular(run, schema.journal_name(table))
    with reading(run, schema.journal_name(table)):
        return read_journal(run / schema.journal_name(table), None).num_rows


# -- load -----------------------------------------------------------------------------
def load_trace(path, tables: Iterable[str] | None = None) -> Trace:
    """Read one run directory. `tables` limits what is read; the rest come back empty."""
    run = Path(path)
    wanted = _wanted(tables)
    with reading(run, "cannot read trace"):
        return _load(run, wanted)


def _load(run: Path, wanted: tuple[str, ...]) -> Trace:
    if not run.exists():
        raise trace_error(run, "no such directory")
    if not run.is_dir():
        raise trace_error(run, "not a directory")
    meta = read_meta(run)
    finished = _finalized(meta)
    arrow, from_journal = _read_tables(run, wanted, meta)
    for table, tbl in arrow.items():
        _check_values(run, table, tbl)
    if _is_empty(run, arrow, finished):
        raise trace_error(run, "trace is empty (no events and no steps)", EmptyTraceError)
    frames = {t: _to_pandas(run, t, arrow[t]) if t in arrow else _empty_frame(t) for t in schema.TABLE_NAMES}
    return Trace(path=run, meta=meta, from_journal=from_journal, **frames)


def _read_tables(run: Path, wanted: tuple[str, ...], meta: dict) -> tuple[dict[str, pa.Table], tuple[str, ...]]:
    """Each wanted table, from Parquet where finalized, else from the journals."""
    status = meta.get("status")
    finalized = _finalized(meta)
    out = {}
    journal_tables = []
    for table in wanted:
        if os.path.lexists(run / schema.parquet_name(table)):
            out[table] = _read_parquet(run, table)
        elif finalized and table in schema.OPTIONAL_TABLES:
            out[table] = schema.empty_table(table)
        elif finalized:
            # Finalizing deletes journals only after every Parquet file is in place.
            raise trace_error(
                run, f"{schema.parquet_name(table)} is missing although the run finished (status {status})"
            )
        else:
            journal_tables.append(table)
    if journal_tables:
        out.update(_read_journals(run, tuple(journal_tables), meta))
    return out, tuple(journal_tables)


def _finalized(meta: dict) -> bool:
    """Whether the capture published its tables: it wrote a final status, and no finalize_error
    (a capture whose finalizing failed keeps its journals, and says so in meta.json). A capture
    that stopped on an error of its own says so at once, and publishes its tables only as the
    script leaves it (ended_at): a process killed in between leaves journals alone."""
    status = meta.get("status")
    if status == schema.Status.CAPTURE_FAILED.value and "ended_at" not in meta:
        return False
    return status is not None and not meta.get("finalize_error")


def _is_empty(run: Path, arrow: dict[str, pa.Table], finished: bool) -> bool:
    def rows(table: str) -> int:
        return arrow[table].num_rows if table in arrow else _row_count(run, table, finished)

    return rows("events") == 0 and rows("steps") == 0


def _to_pandas(run: Path, table: str, tbl: pa.Table) -> pd.DataFrame:
    with reading(run, f"converting table {table}"):
        # Dictionary columns become Categoricals, which analysis groups by.
        return tbl.to_pandas()


def _empty_frame(table: str) -> pd.DataFrame:
    return schema.empty_table(table).to_pandas()
