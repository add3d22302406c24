"""Reads a run directory into a Trace, and finds the runs under a folder.

A trace on disk is input we do not control: a killed process, a full disk, a
copy cut short or a file from another tool. Every way of being wrong ends in a
TraceError with one line naming the run and the problem, never a traceback.
Nothing here writes to the run directory.
"""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from profiler.errors import EmptyTraceError, TraceError, TraceVersionError, UsageError
from profiler.trace import schema
from profiler.trace.finalize.tables import finalize_tables
from profiler.trace.model import Trace
from profiler.trace.schema import RAW_EVENTS
from profiler.trace.writer import read_journal

# What a raw events journal must hold for finalize_tables to rebuild the published table.
_RAW_EVENTS_REQUIRED = ("ts_us", "action", "addr", "size_bytes", "step", "tag")

# finalize_tables derives events and segments categories from these raw tables.
_CLASSIFY_INPUTS = ("events", "roles", "segments")

# Values analysis would silently mis-sum: byte counts are never negative.
_NON_NEGATIVE = {
    "events": ("size_bytes", "block_bytes"),
    "steps": ("allocated_bytes", "reserved_bytes", "active_bytes", "max_allocated_bytes",
              "max_reserved_bytes"),
    "modules": ("param_bytes", "buffer_bytes"),
    "roles": ("size_bytes",),
    "segments": ("segment_bytes", "block_bytes"),
}
# Columns every row must fill: what an event is and how large, which step a row closes.
_NOT_NULL = {"events": ("action", "size_bytes"), "steps": ("step",)}

# meta.json counters: a byte count or count, or null where the backend has none.
_META_COUNTERS = ("baseline_allocated_bytes", "max_allocated_bytes", "max_reserved_bytes",
                  "events_dropped")
_META_STRINGS = ("run_id", "name", "backend")
_STATUSES = tuple(s.value for s in schema.Status)

_MAX_MESSAGE = 400


# -- errors ---------------------------------------------------------------------------
def _one_line(text: str) -> str:
    """Arrow and JSON messages span lines; the CLI promises one."""
    line = re.sub(r"\s+", " ", text).strip()
    return line if len(line) <= _MAX_MESSAGE else line[: _MAX_MESSAGE - 3] + "..."


def _error(run: Path, what: str, cls: type[TraceError] = TraceError) -> TraceError:
    return cls(_one_line(f"{run}: {what}"))


@contextlib.contextmanager
def _reading(run: Path, what: str) -> Iterator[None]:
    """Turn whatever corrupt input raises into a TraceError that says what was being read."""
    try:
        yield
    except TraceError:
        raise
    except RecursionError:
        raise _error(run, f"{what}: nested too deeply") from None
    except Exception as exc:  # noqa: BLE001 - corrupt bytes surface as almost any type
        raise _error(run, f"{what}: {_describe(exc)}") from exc


def _describe(exc: BaseException) -> str:
    if isinstance(exc, FileNotFoundError):
        return "file disappeared while reading"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if isinstance(exc, (KeyError, IndexError)) else text


# -- meta.json ------------------------------------------------------------------------
def _read_meta(run: Path) -> dict:
    meta_path = run / schema.META_FILE
    if not meta_path.is_file():
        raise _error(run, f"not a vramscope trace (no {schema.META_FILE})")
    with _reading(run, schema.META_FILE):
        raw = meta_path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _error(run, f"{schema.META_FILE} is not UTF-8 text (bad byte at offset "
                          f"{exc.start})") from None
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _error(run, f"{schema.META_FILE} is not valid JSON ({exc.msg}, line {exc.lineno} "
                          f"column {exc.colno})") from None
    except (RecursionError, ValueError) as exc:
        raise _error(run, f"{schema.META_FILE} cannot be parsed: {type(exc).__name__}") from None
    _check_meta(run, meta)
    return meta


def _check_meta(run: Path, meta) -> None:
    if not isinstance(meta, dict):
        raise _error(run, f"{schema.META_FILE} is not a JSON object")
    if meta.get("format") != schema.FORMAT_NAME:
        raise _error(run, f"not a vramscope trace ({schema.META_FILE} format is "
                          f"{_show(meta.get('format'))}, expected {schema.FORMAT_NAME!r})")
    version = meta.get("schema_version")
    if not _is_int(version) or version != schema.SCHEMA_VERSION:
        raise _error(run, f"trace schema version {_show(version)} is not supported; this "
                          f"vramscope reads version {schema.SCHEMA_VERSION}", TraceVersionError)
    missing = [k for k in schema.META_REQUIRED if k not in meta]
    if missing:
        raise _error(run, f"{schema.META_FILE} lacks required key(s): {', '.join(missing)}")
    for key in _META_STRINGS:
        if not isinstance(meta[key], str):
            raise _error(run, f"{schema.META_FILE} {key} must be a string, not {_show(meta[key])}")
    for key in _META_COUNTERS:
        value = meta[key]
        if value is not None and not (_is_int(value) and value >= 0):
            raise _error(run, f"{schema.META_FILE} {key} must be a non-negative integer or "
                              f"null, not {_show(value)}")
    if not isinstance(meta["config"], dict):
        raise _error(run, f"{schema.META_FILE} config must be a JSON object")
    status = meta.get("status")
    if status is not None and status not in _STATUSES:
        raise _error(run, f"{schema.META_FILE} status {_show(status)} is not one of "
                          f"{', '.join(_STATUSES)}")


def _is_int(value) -> bool:
    # JSON true would otherwise pass as 1.
    return isinstance(value, int) and not isinstance(value, bool)


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# -- tables ---------------------------------------------------------------------------
def _wanted(tables: Iterable[str] | None) -> tuple[str, ...]:
    if tables is None:
        return schema.TABLE_NAMES
    if isinstance(tables, str):
        tables = (tables,)
    wanted = tuple(tables)
    unknown = [t for t in wanted if t not in schema.TABLES]
    if unknown:
        raise UsageError(f"unknown trace table(s): {', '.join(map(str, unknown))}; tables are "
                         f"{', '.join(schema.TABLE_NAMES)}")
    return tuple(t for t in schema.TABLE_NAMES if t in wanted)  # schema order, no repeats


def _read_parquet(run: Path, table: str) -> pa.Table:
    name = schema.parquet_name(table)
    target = schema.TABLES[table]
    with _reading(run, name):
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
        target = RAW_EVENTS if table == "events" else schema.TABLES[table]
        raw[table] = _read_raw(run, table, target) if table in to_read else target.empty_table()
    with _reading(run, "rebuilding tables from journals"):
        # meta tells finalize the backend and allocator settings that block sizes depend on.
        published = finalize_tables(raw, meta)
    return {t: published[t] for t in tables}


def _read_raw(run: Path, table: str, target: pa.Schema) -> pa.Table:
    name = schema.journal_name(table)
    required = _RAW_EVENTS_REQUIRED if table == "events" else schema.REQUIRED_COLUMNS[table]
    with _reading(run, name):
        # A torn last batch is dropped by read_journal: a killed run keeps its whole batches.
        tbl = read_journal(run / name, target)
        tbl.validate(full=True)
    if tbl.num_rows == 0:
        return target.empty_table()  # an empty journal may carry any schema
    _require(run, name, table, tbl.column_names, required)
    return _conform(run, name, tbl, target)


def _require(run: Path, source: str, table: str, present, required) -> None:
    missing = [c for c in required if c not in present]
    if missing:
        raise _error(run, f"{source}: table {table} lacks required column(s) "
                          f"{', '.join(missing)}")


def _conform(run: Path, source: str, tbl: pa.Table, target: pa.Schema) -> pa.Table:
    """The table with exactly the target's columns and types; optional columns become nulls."""
    arrays = []
    for field in target:
        found = tbl.schema.get_all_field_indices(field.name)
        if len(found) > 1:
            raise _error(run, f"{source}: column {field.name} appears {len(found)} times")
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
        raise _error(run, f"{source}: column {field.name} has type {have}, expected {field.type}")
    try:
        return column.cast(field.type)  # safe: overflow or fractions fail here
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
        raise _error(run, f"{source}: column {field.name} of type {have} does not fit "
                          f"{field.type}: {exc}") from None


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
        return (t.is_list(have) or t.is_large_list(have)) and _same_kind(have.value_type,
                                                                        want.value_type)
    return False


def _check_values(run: Path, table: str, tbl: pa.Table) -> None:
    for column in _NOT_NULL.get(table, ()):
        nulls = tbl.column(column).null_count
        if nulls:
            raise _error(run, f"table {table}: column {column} has {nulls} null value(s)")
    for column in _NON_NEGATIVE.get(table, ()):
        low = pc.min(tbl.column(column)).as_py()
        if low is not None and low < 0:
            raise _error(run, f"table {table}: column {column} has a negative value ({low})")
    if table == "steps" and tbl.num_rows > 1:
        steps = tbl.column("step").to_numpy()
        back = np.flatnonzero(np.diff(steps.astype(np.int64)) < 0)
        if len(back):
            i = int(back[0]) + 1
            raise _error(run, f"table steps: step numbers go backwards at row {i} "
                              f"({int(steps[i - 1])} then {int(steps[i])})")


def _row_count(run: Path, table: str, finished: bool) -> int:
    """Rows in a table that the caller did not ask for: only its metadata is read."""
    path = run / schema.parquet_name(table)
    if path.is_file():
        with _reading(run, path.name), pq.ParquetFile(path) as pf:
            return pf.metadata.num_rows
    if finished:
        raise _error(run, f"{path.name} is missing")
    target = RAW_EVENTS if table == "events" else schema.TABLES[table]
    with _reading(run, schema.journal_name(table)):
        return read_journal(run / schema.journal_name(table), target).num_rows


# -- load -----------------------------------------------------------------------------
def load_trace(path, tables: Iterable[str] | None = None) -> Trace:
    """Read one run directory. `tables` limits what is read; the rest come back empty."""
    run = Path(path)
    wanted = _wanted(tables)
    with _reading(run, "cannot read trace"):
        return _load(run, wanted)


def _load(run: Path, wanted: tuple[str, ...]) -> Trace:
    if not run.exists():
        raise _error(run, "no such directory")
    if not run.is_dir():
        raise _error(run, "not a directory")
    meta = _read_meta(run)
    status = meta.get("status")
    finished = status is not None
    arrow, from_journal = _read_tables(run, wanted, meta)
    for table, tbl in arrow.items():
        _check_values(run, table, tbl)
    if _is_empty(run, arrow, finished):
        raise _error(run, "trace is empty (no events and no steps)", EmptyTraceError)
    frames = {t: _to_pandas(run, t, arrow[t]) if t in arrow else _empty_frame(t)
              for t in schema.TABLE_NAMES}
    return Trace(path=run, meta=meta, from_journal=from_journal, **frames)


def _read_tables(run: Path, wanted: tuple[str, ...],
                 meta: dict) -> tuple[dict[str, pa.Table], tuple[str, ...]]:
    """Each wanted table, from Parquet where finalized, else from the journals."""
    status = meta.get("status")
    out = {}
    journal_tables = []
    for table in wanted:
        if (run / schema.parquet_name(table)).is_file():
            out[table] = _read_parquet(run, table)
        elif status is not None and table in schema.OPTIONAL_TABLES:
            out[table] = schema.empty_table(table)
        elif status is not None:
            # Finalizing deletes journals only after every Parquet file is in place.
            raise _error(run, f"{schema.parquet_name(table)} is missing although the run "
                              f"finished (status {status})")
        else:
            journal_tables.append(table)
    if journal_tables:
        out.update(_read_journals(run, tuple(journal_tables), meta))
    return out, tuple(journal_tables)


def _is_empty(run: Path, arrow: dict[str, pa.Table], finished: bool) -> bool:
    def rows(table: str) -> int:
        return arrow[table].num_rows if table in arrow else _row_count(run, table, finished)

    return rows("events") == 0 and rows("steps") == 0


def _to_pandas(run: Path, table: str, tbl: pa.Table) -> pd.DataFrame:
    with _reading(run, f"converting table {table}"):
        # Dictionary columns become Categoricals, which analysis groups by.
        return tbl.to_pandas()


def _empty_frame(table: str) -> pd.DataFrame:
    return schema.empty_table(table).to_pandas()


# -- many runs ------------------------------------------------------------------------
def iter_runs(root) -> list[Path]:
    """Run directories (holding meta.json) at `root` or up to three levels below it:
    <run_id>/, <group>/<run_id>/ (an ablation's folder), and each of those as a
    multi-rank job, <...>/<run_id>/rank=N/."""
    root = Path(root)
    if not root.is_dir():
        raise _error(root, "no such directory" if not root.exists() else "not a directory")
    found = []
    level = [root]
    for _depth in range(4):
        runs = [d for d in level if (d / schema.META_FILE).is_file()]
        found += runs
        level = [c for d in level if d not in runs for c in _subdirs(d)]  # a run holds no runs
    return sorted(found, key=_natural_key)


def _subdirs(folder: Path) -> list[Path]:
    try:
        return [c for c in folder.iterdir() if c.is_dir() and not c.name.startswith(".")]
    except OSError:
        return []  # an unreadable folder holds no runs we could load anyway


def _natural_key(path: Path) -> list:
    # rank=10 after rank=9, not after rank=1.
    return [[int(p) if p.isdigit() else p for p in re.split(r"(\d+)", part)]
            for part in path.parts]


def load_runs(root, tables: Iterable[str] | None = None) -> list[tuple[Path, Trace | TraceError]]:
    """Every run under `root`, each loaded or with the TraceError that stopped it."""
    out: list[tuple[Path, Trace | TraceError]] = []
    for run in iter_runs(root):
        try:
            out.append((run, load_trace(run, tables)))
        except TraceError as exc:
            out.append((run, exc))
    return out
