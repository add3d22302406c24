"""Input we do not control never hangs, never ends in a traceback, and never prints numbers silently wrong.

Each test is one way a snapshot pickle or a trace on disk was found to go wrong: a pickle of
shared nested lists, a frame list shared two million times, integers past int64, a journal that
is a FIFO or a link to /dev/zero, meta.json counters past int64, event steps outside the steps
table, frees of nothing, a run folder holding rank=0/, a journal column of another type.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import time
from pathlib import Path

import hostile_pickles as hp
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import pytest

from profiler.analysis.integrity import UntrustedTrace, check_module_peaks
from profiler.analysis.live import lifetimes
from profiler.analysis.modules import module_table
from profiler.analysis.timeline import peak
from profiler.cli import main
from profiler.trace import schema
from profiler.trace.reader import load_trace

REPO = Path(__file__).resolve().parents[2]
BUNDLED = REPO / "traces" / "gpt2-small-bf16-h100"


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vramscope: error:"), err
    return lines[0]


def _import(tmp_path, capsys, value) -> tuple[int, str]:
    path = tmp_path / "snap.pickle"
    path.write_bytes(hp.hostile_bytes(value))
    rc = main(["import", str(path), "--out", str(tmp_path / "out")])
    return rc, capsys.readouterr().err


def _cli(args: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
    """The CLI in a child process, so that a hang is a failed test, not a stuck suite."""
    code = "import sys; from profiler.cli import main; sys.exit(main(sys.argv[1:]))"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO
    )


# -- snapshot pickles ----------------------------------------------------------------------


def test_731_byte_pickle_of_shared_nested_lists_imports_at_once(tmp_path, capsys):
    snap = hp.hostile_snapshots()["list_bomb_in_settings"]
    assert len(hp.hostile_bytes(snap)) == 731
    start = time.monotonic()
    rc, err = _import(tmp_path, capsys, snap)
    assert rc == 0, err  # the settings it cannot use are left out
    assert time.monotonic() - start < 20


@pytest.mark.parametrize("where", ["list_bomb_as_segments", "list_bomb_as_entry", "dict_bomb_as_segment"])
def test_shared_nested_values_are_quoted_briefly(tmp_path, capsys, where):
    rc, err = _import(tmp_path, capsys, hp.hostile_snapshots()[where])
    assert rc == 2
    assert len(_one_error_line(err)) < 400


@pytest.mark.slow
def test_frame_list_shared_two_million_times_imports_without_hanging(tmp_path):
    snap = hp._snap(entries=[hp._entry(frames=hp._SHARED_FRAMES)] * 2_000_000)
    path = tmp_path / "snap.pickle"
    path.write_bytes(pickle.dumps(snap, protocol=4))
    done = _cli(["import", str(path), "--out", str(tmp_path / "out")], timeout=110)
    assert done.returncode == 0, done.stderr
    (run,) = (tmp_path / "out").iterdir()
    trace = load_trace(run, tables=("events", "stacks"))
    assert len(trace.events) == 2_000_000
    assert trace.events["stack_id"].nunique() == 1  # one list, walked once (the segment's block has its own)


@pytest.mark.parametrize("stream", ["1", "0"], ids=["streamed", "unpickled"])
def test_lone_surrogates_in_a_snapshot_are_kept_as_escapes(tmp_path, capsys, monkeypatch, stream):
    """Strings UTF-8 cannot hold (a lone surrogate in a file name, a function, user metadata)
    import as backslash escapes, not as a traceback from Arrow."""
    monkeypatch.setenv("VRAMSCOPE_STREAM_IMPORT", stream)
    frame = {"filename": "a\udcffb.py", "line": 3, "name": "f\udcff"}
    snap = hp._snap(entries=[hp._entry(user_metadata="\udcff"), hp._entry(frames=[frame])])
    rc, err = _import(tmp_path, capsys, snap)
    assert rc == 0, err
    (run,) = (tmp_path / "out").iterdir()
    frames = load_trace(run, tables=("frames",)).frames
    assert {"a\\udcffb.py", "f\\udcff"} <= set(frames["filename"]) | set(frames["function"])
    assert main(["report", str(run)]) == 0


def test_segment_shared_two_million_times_is_refused_at_once(tmp_path, capsys):
    rc, err = _import(tmp_path, capsys, hp.hostile_snapshots()["segment_shared_2m"])
    assert rc == 2 and "2,000,000 segments" in _one_error_line(err)


@pytest.mark.parametrize(
    "case", ["total_size_2_70", "address_negative", "size_2_63", "time_2_64", "block_size_2_70", "huge_int_size"]
)
def test_integers_out_of_range_are_one_line_errors(tmp_path, capsys, case):
    rc, err = _import(tmp_path, capsys, hp.hostile_snapshots()[case])
    assert rc == 2
    assert "out" in _one_error_line(err)  # "outside 0..2^63-1" or "out of range"


def test_a_deep_stack_keeps_its_innermost_frames(tmp_path, capsys):
    rc, err = _import(tmp_path, capsys, hp.hostile_snapshots()["one_stack_of_1m_frames"])
    assert rc == 0, err
    (run,) = (tmp_path / "out").iterdir()
    depths = [len(f) for f in load_trace(run, tables=("stacks",)).stacks["frame_ids"]]
    assert max(depths) == 1024  # the entry's; the segment's block has a stack of one


def test_snapshot_that_is_a_fifo_is_refused(tmp_path):
    fifo = tmp_path / "snap.pickle"
    os.mkfifo(fifo)
    done = _cli(["import", str(fifo), "--out", str(tmp_path / "out")], timeout=30)
    assert done.returncode == 2 and "not a regular file" in _one_error_line(done.stderr)


def test_window_keeps_the_entries_asked_for(tmp_path, capsys):
    # A small-pool segment splits its free space for each request, so that every block is 4 KiB.
    entries = [hp._entry(action="alloc", addr=hp.SEG + i * 4096, size=4096, time_us=1000 * i) for i in range(10)]
    blocks = [hp._block(address=hp.SEG + i * 4096, size=4096, requested_size=4096) for i in range(10)]
    rest = 2 * hp.MIB - 10 * 4096
    blocks.append(hp._block(address=hp.SEG + 10 * 4096, size=rest, requested_size=0, state="inactive"))
    seg = hp._segment(total_size=2 * hp.MIB, segment_type="small", blocks=blocks)
    path = tmp_path / "snap.pickle"
    path.write_bytes(pickle.dumps(hp._snap(segments=[seg], entries=entries), protocol=4))
    for args, kept in ((["--since", "3", "--until", "7"], 4), (["--since", "2ms", "--until", "5.5ms"], 4)):
        out = tmp_path / f"out{len(args)}{kept}{args[1]}"
        assert main(["import", str(path), "--out", str(out), *args]) == 0
        (run,) = out.iterdir()
        trace = load_trace(run)
        assert len(trace.events) == kept
        # The start state holds the blocks the window's entries did not allocate: 10 - those after.
        first = int(args[1]) if args[1].isdigit() else 2
        assert trace.baseline_bytes == 4096 * first
        assert trace.meta["max_allocated_bytes"] == 4096 * (first + kept)
    assert main(["import", str(path), "--since", "soon"]) == 2


# -- traces on disk ------------------------------------------------------------------------


@pytest.fixture
def run(tmp_path) -> Path:
    dest = tmp_path / "run"
    shutil.copytree(BUNDLED, dest)
    return dest


def _set_events(run: Path, column: str, values) -> None:
    path = run / schema.parquet_name("events")
    t = pq.read_table(path)
    i = t.schema.get_field_index(column)
    pq.write_table(t.set_column(i, t.schema.field(i), pa.array(values, t.schema.field(i).type)), path)


@pytest.mark.parametrize("special", ["fifo", "dev_zero"])
def test_special_files_in_a_trace_are_one_line_errors(tmp_path, special):
    run = tmp_path / "live"
    shutil.copytree(BUNDLED, run)
    meta = json.loads((run / "meta.json").read_text())
    meta["status"] = None  # unfinished: the reader goes to the journals
    (run / "meta.json").write_text(json.dumps(meta))
    (run / "events.parquet").unlink()
    journal = run / schema.journal_name("events")
    if special == "fifo":
        os.mkfifo(journal)
    else:
        journal.symlink_to("/dev/zero")
    for verb in (["report"], ["info"], ["export", "--memory-viz", str(tmp_path / "x.pickle")]):
        done = _cli([verb[0], str(run), *verb[1:]], timeout=60)
        assert done.returncode == 2, (verb, done.stderr)
        assert "events.journal is not a regular file" in _one_error_line(done.stderr)


def test_meta_counter_past_int64_is_a_one_line_error(run, capsys):
    meta = json.loads((run / "meta.json").read_text())
    meta["baseline_allocated_bytes"] = 2**63
    (run / "meta.json").write_text(json.dumps(meta))
    assert main(["report", str(run)]) == 2
    assert "baseline_allocated_bytes" in _one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("bad_step", [-1, 1000])
def test_event_steps_outside_the_steps_table_are_warned(run, capsys, bad_step):
    steps = pq.read_table(run / "events.parquet").column("step").to_pylist()
    steps[5] = bad_step
    _set_events(run, "step", steps)
    assert main(["report", str(run)]) == 0
    out = capsys.readouterr().out
    assert f"warning: 1 event(s) have steps outside the steps table (0..4): from {bad_step:,}" in out
    assert main(["report", str(run), "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["warnings"]) == 1


def test_frees_of_nothing_are_counted_and_warned(run, capsys):
    t = pq.read_table(run / "events.parquet")
    actions = t.column("action").to_pylist()
    addrs = t.column("addr").to_pylist()
    i = actions.index("free_completed")
    addrs[i] = 12345  # no allocation was ever there
    _set_events(run, "addr", addrs)
    assert main(["report", str(run)]) == 0
    assert "warning: 1 free(s) match no earlier allocation" in capsys.readouterr().out


def test_frees_below_zero_make_the_numbers_untrusted(run, capsys):
    t = pq.read_table(run / "events.parquet")
    sizes = t.column("block_bytes").to_pylist()
    i = t.column("action").to_pylist().index("free_requested")
    sizes[i] = 1 << 50  # a free far larger than anything allocated
    _set_events(run, "block_bytes", sizes)
    assert main(["report", str(run)]) == 2
    assert "cannot be trusted: allocated bytes fall to" in _one_error_line(capsys.readouterr().err)


def test_modules_holding_more_than_the_peak_make_the_numbers_untrusted(run):
    trace = load_trace(run)
    lt = lifetimes(trace)
    modules = module_table(trace, lt=lt)
    top = peak(trace, lt).allocated_bytes
    check_module_peaks(trace, modules, top)  # the bundled run adds up
    with pytest.raises(UntrustedTrace, match="more than the peak"):
        check_module_peaks(trace, modules, int(modules["peak_contribution_bytes"].max()) - 1)


def test_run_folder_holding_rank_0_is_one_run(run, capsys):
    shutil.copytree(BUNDLED, run / "rank=0")
    assert main(["report", str(run), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert "ranks" not in report and report["run"]["path"] == str(run)


def test_retyped_journal_column_is_cast_not_dropped(killed_run):
    journal = killed_run / schema.journal_name("events")
    table = ipc.open_stream(journal.read_bytes()).read_all()
    i = table.schema.get_field_index("size_bytes")
    retyped = table.set_column(i, "size_bytes", table.column(i).cast(pa.int32()))
    with ipc.new_stream(journal, retyped.schema) as w:
        w.write_table(retyped)
    events = load_trace(killed_run).events
    assert len(events) == table.num_rows
    assert events["size_bytes"].tolist() == table.column("size_bytes").to_pylist()


def test_journal_column_of_another_kind_is_a_one_line_error(killed_run, capsys):
    journal = killed_run / schema.journal_name("events")
    table = ipc.open_stream(journal.read_bytes()).read_all()
    i = table.schema.get_field_index("size_bytes")
    retyped = table.set_column(i, "size_bytes", pa.array(["x"] * table.num_rows))
    with ipc.new_stream(journal, retyped.schema) as w:
        w.write_table(retyped)
    assert main(["report", str(killed_run)]) == 2
    assert "column size_bytes has type string" in _one_error_line(capsys.readouterr().err)
