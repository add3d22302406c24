"""The reader (profiler.trace.reader) and the CLI around it (`vramscope info`)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import KILLED_FLUSHES, SAMPLE_EVENTS, finished_trace, killed_trace
from fakes import write_trace

from profiler.cli import main
from profiler.errors import EmptyTraceError, TraceError, TraceVersionError, UsageError
from profiler.trace import schema
from profiler.trace.layout import iter_runs, load_runs
from profiler.trace.reader import load_trace

REPO = Path(__file__).resolve().parents[2]


def _fingerprint(run: Path) -> dict:
    return {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in sorted(run.iterdir())}


def _edit_meta(run: Path, **changes) -> None:
    meta = json.loads((run / schema.META_FILE).read_text())
    meta.update(changes)
    (run / schema.META_FILE).write_text(json.dumps(meta))


def _rewrite_parquet(run: Path, table: str, change) -> None:
    path = run / schema.parquet_name(table)
    pq.write_table(change(pq.read_table(path)), path)


def _replace(t: pa.Table, column: str, values) -> pa.Table:
    return t.set_column(t.schema.get_field_index(column), column, values)


def _one_line_error(exc_info, *needles) -> str:
    message = str(exc_info.value)
    assert len(message.splitlines()) == 1, message
    for needle in needles:
        assert needle in message, (needle, message)
    return message


# -- loading good runs ----------------------------------------------------------------------
def test_finished_run_loads_with_categoricals(finished_run):
    trace = load_trace(finished_run)
    ev = trace.events
    assert list(ev.columns) == schema.TABLES["events"].names
    assert len(ev) == len(SAMPLE_EVENTS)
    for column in ("action", "module", "phase", "category"):
        assert isinstance(ev[column].dtype, pd.CategoricalDtype), column
    assert ev["action"].tolist() == [e[0] for e in SAMPLE_EVENTS]
    assert ev["category"].iloc[2] == "gradient"  # the hint stamped at allocation
    assert trace.status == "complete" and trace.from_journal == ()
    assert trace.steps["step"].tolist() == [0, 1]
    assert len(trace.roles) == len(trace.modules) == len(trace.segments) == 1


def test_killed_run_loads_from_journals(killed_run):
    before = _fingerprint(killed_run)
    trace = load_trace(killed_run)
    assert trace.status == "running"
    assert set(trace.from_journal) == set(schema.TABLE_NAMES)
    assert len(trace.events) == KILLED_FLUSHES * len(SAMPLE_EVENTS)
    assert isinstance(trace.events["category"].dtype, pd.CategoricalDtype)
    assert trace.events["category"].notna().all()  # classified, as finalize would have
    assert trace.events["phase"].notna().all()
    assert trace.steps["step"].tolist() == list(range(KILLED_FLUSHES))
    # finalize saw meta: on the CPU backend a block is the storage itself, nothing replayed.
    assert trace.events["block_bytes"].tolist() == trace.events["size_bytes"].tolist()
    assert _fingerprint(killed_run) == before  # journals are read, never consumed


def test_journal_and_parquet_agree_on_categories(tmp_path):
    killed = load_trace(killed_trace(tmp_path / "a"))
    n = len(SAMPLE_EVENTS)
    finished = load_trace(finished_trace(tmp_path / "b"))
    assert killed.events["category"].iloc[:n].tolist() == finished.events["category"].tolist()


@pytest.mark.parametrize("cut", [1, 8, 40])
def test_torn_journal_keeps_its_whole_batches(killed_run, cut):
    journal = killed_run / schema.journal_name("events")
    with open(journal, "r+b") as f:
        f.truncate(journal.stat().st_size - cut)
    trace = load_trace(killed_run)
    assert len(trace.events) == (KILLED_FLUSHES - 1) * len(SAMPLE_EVENTS)
    assert trace.events["category"].notna().all()


def test_run_killed_while_finalizing_mixes_parquet_and_journals(tmp_path, killed_run):
    # Finalize writes every Parquet file before deleting any journal.
    done = finished_trace(tmp_path / "done")
    (killed_run / "modules.parquet").write_bytes((done / "modules.parquet").read_bytes())
    trace = load_trace(killed_run)
    assert "modules" not in trace.from_journal and "events" in trace.from_journal


def test_tables_argument_reads_only_those(finished_run):
    (finished_run / "frames.parquet").write_bytes(b"never read")
    trace = load_trace(finished_run, tables=("events",))
    assert len(trace.events) == len(SAMPLE_EVENTS)
    assert trace.steps.empty and list(trace.steps.columns) == schema.TABLES["steps"].names
    assert isinstance(trace.segments["state"].dtype, pd.CategoricalDtype)


def test_unknown_table_is_a_usage_error(finished_run):
    with pytest.raises(UsageError, match="nope"):
        load_trace(finished_run, tables=("events", "nope"))


def test_compatible_foreign_types_are_cast(finished_run):
    def plain(t: pa.Table) -> pa.Table:
        t = _replace(t, "action", t.column("action").cast(pa.string()))
        t = _replace(t, "size_bytes", t.column("size_bytes").cast(pa.int32()))
        return t.append_column("extra", pa.array(["x"] * t.num_rows))

    _rewrite_parquet(finished_run, "events", plain)
    ev = load_trace(finished_run).events
    assert isinstance(ev["action"].dtype, pd.CategoricalDtype)
    assert ev["size_bytes"].dtype == "int64" and "extra" not in ev.columns


def test_missing_optional_column_becomes_nulls(finished_run):
    _rewrite_parquet(finished_run, "steps", lambda t: t.drop_columns(["active_bytes"]))
    assert load_trace(finished_run).steps["active_bytes"].isna().all()


# -- bad runs -------------------------------------------------------------------------------
def test_wrong_version(finished_run):
    _edit_meta(finished_run, schema_version=99)
    with pytest.raises(TraceVersionError) as e:
        load_trace(finished_run)
    _one_line_error(e, str(finished_run), "99", f"version {schema.SCHEMA_VERSION}")


def test_missing_column(finished_run):
    _rewrite_parquet(finished_run, "events", lambda t: t.drop_columns(["addr"]))
    with pytest.raises(TraceError) as e:
        load_trace(finished_run)
    _one_line_error(e, str(finished_run), "events", "addr")


@pytest.mark.parametrize(
    "column, values",
    [
        ("size_bytes", lambda n: pa.array(["big"] * n)),
        ("action", lambda n: pa.array([1.5] * n)),
        ("addr", lambda n: pa.array([1.5] * n)),  # a float that is not an integer
    ],
)
def test_wrong_column_type(finished_run, column, values):
    _rewrite_parquet(finished_run, "events", lambda t: _replace(t, column, values(t.num_rows)))
    with pytest.raises(TraceError) as e:
        load_trace(finished_run)
    _one_line_error(e, str(finished_run), column)


def test_negative_size(finished_run):
    _rewrite_parquet(
        finished_run, "events", lambda t: _replace(t, "size_bytes", pa.array([-1] * t.num_rows, pa.int64()))
    )
    with pytest.raises(TraceError) as e:
        load_trace(finished_run)
    _one_line_error(e, "size_bytes", "negative")


def test_steps_going_backwards(finished_run):
    _rewrite_parquet(finished_run, "steps", lambda t: _replace(t, "step", pa.array([1, 0], pa.int32())))
    with pytest.raises(TraceError) as e:
        load_trace(finished_run)
    _one_line_error(e, "steps", "backwards")


def test_empty_run(tmp_path):
    run = write_trace(tmp_path, [], steps=[])
    with pytest.raises(EmptyTraceError) as e:
        load_trace(run)
    _one_line_error(e, str(run), "empty")


def test_not_a_trace_dir(tmp_path):
    with pytest.raises(TraceError) as e:
        load_trace(tmp_path)
    _one_line_error(e, str(tmp_path), "meta.json")


def test_missing_dir(tmp_path):
    with pytest.raises(TraceError) as e:
        load_trace(tmp_path / "gone")
    _one_line_error(e, "gone", "no such directory")


def test_file_instead_of_dir(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(TraceError) as e:
        load_trace(tmp_path / "f")
    _one_line_error(e, "not a directory")


@pytest.mark.parametrize(
    "text, needle",
    [
        ('{"format": ', "not valid JSON"),
        ("[1, 2]", "not a JSON object"),
        ('{"format": "other"}', "not a vramscope trace"),
        (b"\xff\xfe{}", "UTF-8"),
    ],
)
def test_corrupt_meta(finished_run, text, needle):
    path = finished_run / schema.META_FILE
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(TraceError) as e:
        load_trace(finished_run)
    _one_line_error(e, str(finished_run), needle)


@pytest.mark.parametrize(
    "changes, needle",
    [
        ({"schema_version": True}, "version"),  # JSON true is not version 1
        ({"max_allocated_bytes": -5}, "max_allocated_bytes"),
        ({"status": "exploded"}, "status"),
        ({"config": [1]}, "config"),
    ],
)
def test_bad_meta_values(finished_run, changes, needle):
    _edit_meta(finished_run, **changes)
    with pytest.raises(TraceError) as e:
        load_trace(finished_run)
    _one_line_error(e, needle)


def test_meta_missing_keys(finished_run):
    meta = json.loads((finished_run / schema.META_FILE).read_text())
    del meta["device"], meta["config"]
    (finished_run / schema.META_FILE).write_text(json.dumps(meta))
    with pytest.raises(TraceError) as e:
        load_trace(finished_run)
    _one_line_error(e, "device", "config")


def test_finished_run_missing_parquet(finished_run):
    (finished_run / "steps.parquet").unlink()
    with pytest.raises(TraceError) as e:
        load_trace(finished_run)
    _one_line_error(e, "steps.parquet", "missing")


def test_truncated_parquet(finished_run):
    path = finished_run / "events.parquet"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(TraceError) as e:
        load_trace(finished_run)
    _one_line_error(e, "events.parquet")


def test_multiline_cause_becomes_one_line(tmp_path):
    with pytest.raises(TraceError) as e:
        load_trace(tmp_path / "two\nlines")
    _one_line_error(e, "no such directory")


# -- many runs ------------------------------------------------------------------------------
def _make_runs(root: Path) -> dict[str, Path]:
    good = finished_trace(root)
    bad = killed_trace(root)
    (bad / schema.META_FILE).write_text("{ not json")
    ranks = {}
    for rank in (0, 2, 10):  # one partition per rank, as TraceWriter(subdir="rank=N") lays out
        ranks[rank] = Path(shutil.copytree(good, root / "multi" / f"rank={rank}"))
    (root / "notes").mkdir()
    grouped = root / "a" / "b" / "c"  # <group>/<job>/<partition>: three levels down, found
    grouped.mkdir(parents=True)
    (grouped / schema.META_FILE).write_text("{}")
    deep = root / "a" / "b" / "c2" / "d"
    deep.mkdir(parents=True)
    (deep / schema.META_FILE).write_text("{}")  # four levels down: not searched
    return {"good": good, "bad": bad, "grouped": grouped, **{f"rank{r}": p for r, p in ranks.items()}}


def test_iter_runs_finds_runs_three_levels_deep(tmp_path):
    runs = _make_runs(tmp_path)
    found = iter_runs(tmp_path)
    assert set(found) == set(runs.values())
    rank_order = [p.name for p in found if p.parent.name == "multi"]
    assert rank_order == ["rank=0", "rank=2", "rank=10"]


def test_iter_runs_of_a_run_is_that_run(finished_run):
    assert iter_runs(finished_run) == [finished_run]


def test_iter_runs_missing_root(tmp_path):
    with pytest.raises(TraceError):
        iter_runs(tmp_path / "nope")


def test_load_runs_keeps_going_past_a_bad_run(tmp_path):
    runs = _make_runs(tmp_path)
    results = dict(load_runs(tmp_path))
    assert isinstance(results[runs["bad"]], TraceError)
    assert "not valid JSON" in str(results[runs["bad"]])
    good = [r for r in results.values() if not isinstance(r, TraceError)]
    assert len(good) == 4 and all(len(t.events) == len(SAMPLE_EVENTS) for t in good)


# -- CLI ------------------------------------------------------------------------------------
def test_info_prints_meta_and_counts(finished_run, capsys):
    assert main(["info", str(finished_run)]) == 0
    out = capsys.readouterr().out
    assert "complete" in out and "events" in out and "parquet" in out


def test_info_json(killed_run, capsys):
    assert main(["info", "--json", str(killed_run)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["status"] == "running"
    assert summary["tables"]["events"] == {"rows": KILLED_FLUSHES * len(SAMPLE_EVENTS), "source": "journal"}


def test_info_bad_trace_is_one_line_exit_2(tmp_path, capsys):
    assert main(["info", str(tmp_path / "missing")]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1
    assert captured.err.startswith("vramscope: error: ") and "missing" in captured.err


def test_usage_errors_exit_2(capsys):
    assert main([]) == 2
    assert main(["frobnicate"]) == 2
    assert main(["info"]) == 2  # RUN is required
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("vramscope: error:") for line in err)
    assert "RUN" in err[-1]


def test_help_exits_0_and_lists_verbs(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for verb in ("run", "report", "info"):
        assert verb in out


def test_keyboard_interrupt_exits_130(monkeypatch, finished_run):
    import profiler.cli.info as info

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(info, "run", interrupted)
    assert main(["info", str(finished_run)]) == 130


def _python(code: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, *args] if not code else [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=120,
    )


def test_cli_imports_only_the_chosen_verb():
    # `vramscope --help` must not import any verb, nor pandas (the capture process stays lean).
    code = (
        "import sys; from profiler.cli import main; rc = main(['--help']);"
        "bad = [m for m in sys.modules if m == 'pandas' or m.startswith('profiler.cli.')];"
        "print(bad); sys.exit(rc)"
    )
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_python_dash_m(finished_run):
    proc = _python("", "-m", "profiler.cli", "info", str(finished_run))
    assert proc.returncode == 0, proc.stderr
    assert "events" in proc.stdout
    proc = _python("", "-m", "profiler.cli", "info", str(finished_run / "nope"))
    assert proc.returncode == 2
    assert proc.stderr.startswith("vramscope: error:") and proc.stderr.count("\n") == 1
