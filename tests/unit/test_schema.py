"""The trace format is defined once (schema.COLUMNS, schema.META_KEYS): the derived schemas, required
columns and value checks agree with each other, and the reader enforces exactly what they say."""

from __future__ import annotations

import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from profiler.errors import TraceError
from profiler.trace import schema
from profiler.trace.reader import load_trace

PUBLISHED_EVENTS = (
    "ts_us",
    "action",
    "addr",
    "size_bytes",
    "block_bytes",
    "stream",
    "step",
    "module",
    "phase",
    "category",
    "stack_id",
)
JOURNAL_EVENTS = ("ts_us", "action", "addr", "size_bytes", "stream", "step", "tag", "stack_id")


def test_events_journal_and_table_differ_only_in_what_finalize_derives():
    assert tuple(schema.TABLES["events"].names) == PUBLISHED_EVENTS
    assert tuple(schema.RAW_EVENTS.names) == JOURNAL_EVENTS
    assert schema.RAW_EVENTS.equals(schema.JOURNALS["events"])
    assert schema.JOURNAL_REQUIRED_COLUMNS["events"] == ("ts_us", "action", "addr", "size_bytes", "step", "tag")
    for table in schema.TABLE_NAMES:
        if table != "events":  # every other journal is its published table
            assert schema.JOURNALS[table].equals(schema.TABLES[table]), table
            assert schema.JOURNAL_REQUIRED_COLUMNS[table] == schema.REQUIRED_COLUMNS[table], table


def test_tables_are_their_columns():
    assert schema.TABLE_NAMES == tuple(schema.COLUMNS)
    for table, columns in schema.COLUMNS.items():
        names = [c.name for c in columns]
        assert len(names) == len(set(names)), table
        published = [(c.name, c.type) for c in columns if c.published]
        assert schema.TABLES[table].equals(pa.schema(published)), table
        assert schema.empty_table(table).schema.equals(schema.TABLES[table])
        assert schema.empty_journal(table).schema.equals(schema.JOURNALS[table])


def test_every_required_or_checked_column_is_in_its_table():
    for table in schema.TABLE_NAMES:
        assert set(schema.REQUIRED_COLUMNS[table]) <= set(schema.TABLES[table].names), table
        assert set(schema.JOURNAL_REQUIRED_COLUMNS[table]) <= set(schema.JOURNALS[table].names), table
    for checks in (schema.NON_NEGATIVE, schema.NOT_NULL, schema.NON_DECREASING):
        for table, columns in checks.items():
            assert set(columns) <= set(schema.TABLES[table].names), (table, columns)
            for column in columns:
                assert pa.types.is_integer(schema.TABLES[table].field(column).type) or column in schema.NOT_NULL.get(
                    table, ()
                ), (table, column)


def test_derived_checks_are_the_formats():
    assert schema.REQUIRED_COLUMNS["steps"] == (
        "step",
        "ts_us",
        "allocated_bytes",
        "reserved_bytes",
        "max_allocated_bytes",
    )
    assert schema.REQUIRED_COLUMNS["events"] == PUBLISHED_EVENTS
    assert schema.NON_NEGATIVE == {
        "events": ("size_bytes", "block_bytes"),
        "steps": ("allocated_bytes", "reserved_bytes", "active_bytes", "max_allocated_bytes", "max_reserved_bytes"),
        "modules": ("param_bytes", "buffer_bytes"),
        "roles": ("size_bytes",),
        "segments": ("segment_bytes", "block_bytes"),
    }
    assert schema.NOT_NULL == {"events": ("action", "size_bytes"), "steps": ("step",)}
    assert schema.NON_DECREASING == {"steps": ("step",)}


def test_meta_keys():
    assert schema.META_REQUIRED == (
        "format",
        "schema_version",
        "run_id",
        "name",
        "backend",
        "device",
        "torch_version",
        "config",
        "allocator_settings",
        "baseline_allocated_bytes",
        "max_allocated_bytes",
        "max_reserved_bytes",
        "events_dropped",
    )
    assert schema.META_STRINGS == ("run_id", "name", "backend")
    assert schema.META_COUNTERS == (
        "baseline_allocated_bytes",
        "max_allocated_bytes",
        "max_reserved_bytes",
        "events_dropped",
    )
    assert schema.META_OBJECTS == ("config",)
    assert "status" not in schema.META_REQUIRED and "status" in {k.name for k in schema.META_KEYS}


# -- the reader enforces what the columns say ------------------------------------------------


@pytest.fixture
def run(sample_runs, tmp_path):
    """A private copy of the finished sample run: every table has rows."""
    return shutil.copytree(sample_runs["finished"], tmp_path / "run")


def _rewrite(run, table: str, change) -> None:
    path = run / schema.parquet_name(table)
    pq.write_table(change(pq.read_table(path)), path)


def _set(t: pa.Table, column: str, value) -> pa.Table:
    field = t.schema.field(column)
    return t.set_column(t.schema.get_field_index(column), field, pa.array([value] * t.num_rows, field.type))


def _error(run) -> str:
    with pytest.raises(TraceError) as e:
        load_trace(run)
    return str(e.value)


COLUMNS = [(t, c.name, c.required) for t, cols in schema.COLUMNS.items() for c in cols if c.published]


@pytest.mark.parametrize("table, column, required", COLUMNS, ids=[f"{t}.{c}" for t, c, _ in COLUMNS])
def test_a_missing_column_is_rejected_exactly_when_required(run, table, column, required):
    _rewrite(run, table, lambda t: t.drop_columns([column]))
    if required:
        assert column in _error(run) and "lacks required column" in _error(run)
    else:
        frame = getattr(load_trace(run), table)
        assert column in frame.columns and frame[column].isna().all()


NEGATIVE = [(t, c) for t, cols in schema.NON_NEGATIVE.items() for c in cols]


@pytest.mark.parametrize("table, column", NEGATIVE, ids=[f"{t}.{c}" for t, c in NEGATIVE])
def test_a_negative_count_is_rejected(run, table, column):
    _rewrite(run, table, lambda t: _set(t, column, -1))
    message = _error(run)
    assert f"table {table}: column {column} has a negative value (-1)" in message


NULLS = [(t, c) for t, cols in schema.NOT_NULL.items() for c in cols]


@pytest.mark.parametrize("table, column", NULLS, ids=[f"{t}.{c}" for t, c in NULLS])
def test_a_null_in_a_not_null_column_is_rejected(run, table, column):
    _rewrite(run, table, lambda t: _set(t, column, None))
    assert f"table {table}: column {column} has" in _error(run) and "null value" in _error(run)


def test_a_non_decreasing_column_that_goes_back_is_rejected(run):
    _rewrite(run, "steps", lambda t: t.set_column(0, "step", pa.array([1, 0], pa.int32())))
    assert "table steps: step numbers go backwards at row 1 (1 then 0)" in _error(run)


def _edit_meta(run, change) -> None:
    path = run / schema.META_FILE
    meta = json.loads(path.read_text())
    change(meta)
    path.write_text(json.dumps(meta))


@pytest.mark.parametrize("key", schema.META_REQUIRED)
def test_each_required_meta_key_is_required(run, key):
    _edit_meta(run, lambda m: m.pop(key))
    message = _error(run)
    assert key in message or key.replace("_", " ") in message  # "schema version None is not supported"


@pytest.mark.parametrize(
    "key, bad",
    [(k, -1) for k in schema.META_COUNTERS]
    + [(k, 5) for k in schema.META_STRINGS]
    + [(k, [1]) for k in schema.META_OBJECTS],
)
def test_each_typed_meta_key_is_checked(run, key, bad):
    _edit_meta(run, lambda m: m.update({key: bad}))
    assert f"meta.json {key} must be" in _error(run)
