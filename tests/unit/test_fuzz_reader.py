"""Corrupted traces never crash the reader or `vramscope info`.

One finished and one killed run are built once per session (conftest's
sample_runs); every example copies one of them and applies a few drawn
corruptions. The reader must either load the result or raise a TraceError with
a one-line message; the CLI must exit 0 or 2 and, on 2, print exactly one
`vramscope: error:` line. Reading must leave the directory as it found it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from profiler.cli import main
from profiler.errors import TraceError
from profiler.trace import schema
from profiler.trace.journal import read_journal
from profiler.trace.reader import load_trace

pytestmark = pytest.mark.slow

# -- corruptions: each takes hypothesis `data` and the run dir, and changes the dir ------------
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
META_KEYS = schema.META_REQUIRED + ("status", "ended_at", "event_count")


def _pick_file(data, run: Path) -> Path | None:
    files = sorted(p for p in run.iterdir() if p.is_file())
    return data.draw(st.sampled_from(files)) if files else None


def truncate(data, run):
    if f := _pick_file(data, run):
        size = f.stat().st_size
        with open(f, "r+b") as fh:
            fh.truncate(data.draw(st.integers(0, max(size - 1, 0))))


def flip_bytes(data, run):
    if (f := _pick_file(data, run)) and (raw := bytearray(f.read_bytes())):
        for _ in range(data.draw(st.integers(1, 8))):
            raw[data.draw(st.integers(0, len(raw) - 1))] ^= data.draw(st.integers(1, 255))
        f.write_bytes(bytes(raw))


def overwrite(data, run):
    if (f := _pick_file(data, run)) and (raw := bytearray(f.read_bytes())):
        at = data.draw(st.integers(0, len(raw) - 1))
        chunk = data.draw(st.binary(min_size=1, max_size=64))
        raw[at : at + len(chunk)] = chunk
        f.write_bytes(bytes(raw))


def delete(data, run):
    if f := _pick_file(data, run):
        f.unlink()


def garbage(data, run):
    names = [schema.META_FILE] + [n(t) for t in schema.TABLE_NAMES for n in (schema.parquet_name, schema.journal_name)]
    (run / data.draw(st.sampled_from(names))).write_bytes(data.draw(st.binary(max_size=256)))


def dir_in_place(data, run):
    """A directory where a file belongs: open() raises IsADirectoryError."""
    f = _pick_file(data, run)
    if f:
        f.unlink()
        f.mkdir()


def meta_replace(data, run):
    (run / schema.META_FILE).write_text(json.dumps(data.draw(json_values)))


def meta_text(data, run):
    (run / schema.META_FILE).write_bytes(
        data.draw(st.binary(max_size=64)) if data.draw(st.booleans()) else data.draw(st.text(max_size=64)).encode()
    )


def meta_edit(data, run):
    meta = _meta(run)
    if isinstance(meta, dict):
        key = data.draw(st.sampled_from(META_KEYS))
        if data.draw(st.booleans()):
            meta.pop(key, None)
        else:
            meta[key] = data.draw(json_values)
        (run / schema.META_FILE).write_text(json.dumps(meta))


def meta_version(data, run):
    meta = _meta(run)
    if isinstance(meta, dict):
        meta["schema_version"] = data.draw(st.integers(-2, 5) | st.just(True) | st.just(1.0) | st.just("1"))
        (run / schema.META_FILE).write_text(json.dumps(meta))


def _meta(run):
    try:
        return json.loads((run / schema.META_FILE).read_text())
    except Exception:  # an earlier corruption got there first
        return None


def _table_file(data, run) -> Path | None:
    files = sorted(p for p in run.iterdir() if p.suffix in (".parquet", ".journal") and p.is_file())
    return data.draw(st.sampled_from(files)) if files else None


def _rewrite(path: Path, change) -> None:
    """Apply `change(table) -> table` to a Parquet file or journal, in its own format."""
    try:
        if path.suffix == ".parquet":
            tbl = pq.read_table(path)
        else:
            tbl = read_journal(path, None)
        tbl.validate(full=True)  # an earlier byte flip can decode into nonsense lengths
        tbl = change(tbl)
    except Exception:  # already unreadable, or the change does not apply: leave it
        return
    if path.suffix == ".parquet":
        pq.write_table(tbl, path)
    else:
        with ipc.new_stream(path, tbl.schema) as w:
            w.write_table(tbl)


def drop_column(data, run):
    if f := _table_file(data, run):
        i = data.draw(st.integers(0, 20))
        _rewrite(f, lambda t: t.remove_column(i % t.num_columns))


def rename_column(data, run):
    if f := _table_file(data, run):
        i, new = data.draw(st.integers(0, 20)), data.draw(st.text(max_size=10))
        _rewrite(
            f, lambda t: t.rename_columns([new if j == i % t.num_columns else n for j, n in enumerate(t.column_names)])
        )


def duplicate_column(data, run):
    if f := _table_file(data, run):
        i = data.draw(st.integers(0, 20))
        _rewrite(f, lambda t: t.append_column(t.schema.field(i % t.num_columns), t.column(i % t.num_columns)))


RETYPES = [
    pa.string(),
    pa.float64(),
    pa.int8(),
    pa.uint64(),
    pa.bool_(),
    pa.null(),
    pa.list_(pa.int64()),
    pa.binary(),
    pa.timestamp("us"),
]


def retype_column(data, run):
    """Replace a column by one of another type, filled with drawn values or nulls."""
    if f := _table_file(data, run):
        i, typ = data.draw(st.integers(0, 20)), data.draw(st.sampled_from(RETYPES))
        value = data.draw(st.sampled_from([None, 0, -1, 1.5, "x", True, [1]]))

        def change(t):
            j = i % t.num_columns
            try:
                col = pa.array([value] * t.num_rows, typ)
            except Exception:
                col = pa.nulls(t.num_rows, typ)
            return t.set_column(j, t.schema.field(j).name, col)

        _rewrite(f, change)


def set_values(data, run):
    """Integer columns get drawn values: negative sizes, steps that go backwards, overflow."""
    if f := _table_file(data, run):
        i = data.draw(st.integers(0, 20))
        edges = st.sampled_from([-1, -(2**63), 2**31, 2**63 - 1])
        values = data.draw(st.lists(st.integers(-3, 3) | edges | st.none(), min_size=1, max_size=4))

        def change(t):
            j = i % t.num_columns
            col = [values[k % len(values)] for k in range(t.num_rows)]
            return t.set_column(j, t.schema.field(j).name, pa.array(col, pa.int64()))

        _rewrite(f, change)


CORRUPTIONS = [
    truncate,
    flip_bytes,
    overwrite,
    delete,
    garbage,
    dir_in_place,
    meta_replace,
    meta_text,
    meta_edit,
    meta_version,
    drop_column,
    rename_column,
    duplicate_column,
    retype_column,
    set_values,
]


def _fingerprint(run: Path) -> dict:
    return {
        str(p.relative_to(run)): hashlib.md5(p.read_bytes()).hexdigest() if p.is_file() else "d"
        for p in sorted(run.rglob("*"))
    }


@settings(
    max_examples=1000,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=st.data())
def test_corrupted_traces_fail_cleanly(sample_runs, capsys, data):
    base = sample_runs[data.draw(st.sampled_from(sorted(sample_runs)), label="base")]
    corruptions = data.draw(st.lists(st.sampled_from(CORRUPTIONS), min_size=1, max_size=3), label="corruptions")
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        shutil.copytree(base, run)
        for corrupt in corruptions:
            with contextlib.suppress(OSError):  # e.g. writing where dir_in_place left a folder
                corrupt(data, run)
        before = _fingerprint(run)

        try:
            load_trace(run)
            loaded = True
        except TraceError as exc:
            loaded = False
            message = str(exc)
            assert len(message.splitlines()) == 1, repr(message)

        capsys.readouterr()  # drop what earlier examples left
        rc = main(["info", str(run)])
        out, err = capsys.readouterr()
        assert rc == (0 if loaded else 2), (rc, err)
        if rc == 2:
            lines = err.splitlines()
            assert len(lines) == 1 and lines[0].startswith("vramscope: error:"), err
        else:
            assert err == "" and out
        assert _fingerprint(run) == before, "reading changed the run directory"
