"""The streaming snapshot reader writes exactly the tables the standard unpickler's path writes.

Each snapshot is imported twice, streamed and with the streaming reader turned off
(VRAMSCOPE_STREAM_IMPORT=0, the unpickler path), whole and through --since/--until
windows, and every table and meta.json field must be equal (ids included). Snapshots the
reader does not take (protocol 0, a traceback changed after use) must come out the same too,
read by the unpickler, with the reason in meta.json's `imported.reader`.
"""

from __future__ import annotations

import importlib.util
import json
import pickle
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from test_memviz import SMALL, _entry, _snapshot

from profiler.cli import main
from profiler.interop.memviz import native
from profiler.interop.memviz.stream import STREAM_ENV

REPO = Path(__file__).resolve().parents[2]
WINDOWS = [[], ["--since", "5", "--until", "15"], ["--since", "100us"], ["--until", "3"]]
VOLATILE = ("run_id", "pid", "hostname", "started_at", "ended_at")

# Where a compiler is, the reader must build: a broken build must not pass as a skip.
pytestmark = pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler: imports use the unpickler")


def test_reader_builds():
    assert native.load()[0] is not None, native.load()[1]


def test_without_the_reader_the_unpickler_reads(tmp_path, monkeypatch, capsys):
    """No compiler (or no torch headers): the import still works, and says which reader read."""
    monkeypatch.setattr(native, "_loaded", [(None, "FileNotFoundError: no C++ compiler (c++) on PATH")])
    path = tmp_path / "snap.pickle"
    path.write_bytes(pickle.dumps(_snapshot(), protocol=4))
    monkeypatch.setenv(STREAM_ENV, "1")
    assert main(["import", str(path), "--out", str(tmp_path / "runs")]) == 0
    (run,) = (tmp_path / "runs").iterdir()
    reader = json.loads((run / "meta.json").read_text())["imported"]["reader"]
    assert reader == "unpickler (no streaming reader: FileNotFoundError: no C++ compiler (c++) on PATH)"
    capsys.readouterr()


def _bench_snapshot(entries: int) -> dict:
    spec = importlib.util.spec_from_file_location("import_big", REPO / "bench" / "import_big.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build_snapshot(entries)


def _odd_stacks() -> dict:
    """Tracebacks as the interner must take them: shared between entries, deeper than the
    1,024 frames kept, with items that are not frames, and with distinct but equal frame dicts."""
    snap = _snapshot()
    entries = snap["device_traces"][0]
    deep = [{"filename": "deep.py", "line": i % 1500, "name": f"d{i % 1100}"} for i in range(1500)]
    shared = [{"filename": "s.py", "line": 1, "name": "s"}, "not a frame", 7, None]
    equal = [
        {"filename": "train.py", "line": 10, "name": "f_alloc"},
        {"filename": "main.py", "line": 3, "name": "main"},
    ]
    for i, e in enumerate(entries):
        e["frames"] = [deep, shared, equal, [], None, shared + deep[:3]][i % 6]
        e["user_metadata"] = [None, 5, "", "forward|m|activation", "m.x", "m.y"][i % 6]
        if i % 4 == 1:
            e["stream"] = -3
        if i % 5 == 2:
            e.pop("time_us")
    snap["segments"][0]["blocks"][0]["frames"] = deep
    return snap


def _two_devices() -> dict:
    snap = _snapshot()
    one = dict(snap["segments"][0], device=1, address=SMALL + (8 << 32))
    one["blocks"] = [dict(b, address=b["address"] + (8 << 32)) for b in one["blocks"]]
    snap["segments"].append(one)
    addr = SMALL + (8 << 32) + 4096
    snap["device_traces"].append([_entry(a, addr, 512, t) for a, t in (("alloc", 5), ("free_requested", 6))] * 9)
    return snap


SNAPSHOTS = {
    "plain": _snapshot,
    "wrapped ring": lambda: _snapshot(drop_first=3),
    "no stacks": lambda: _snapshot(stacks=False),
    "odd stacks": _odd_stacks,
    "two devices": _two_devices,
    "bench": lambda: _bench_snapshot(4000),
}


def _run(tmp_path: Path, monkeypatch, pickle_path: Path, args: list[str], streamed: bool) -> tuple[dict, dict]:
    """(tables by file name, meta without what differs per run) of one import."""
    out = tmp_path / f"run-{len(list(tmp_path.iterdir()))}"
    monkeypatch.setenv(STREAM_ENV, "1" if streamed else "0")
    assert main(["import", str(pickle_path), "--out", str(out), *args]) == 0
    (run,) = out.iterdir()
    tables = {f.name: pq.read_table(f) for f in sorted(run.glob("*.parquet"))}
    meta = json.loads((run / "meta.json").read_text())
    for key in VOLATILE:
        meta.pop(key)
    return tables, meta


def _same(tmp_path, monkeypatch, data: bytes, args: list[str]) -> str:
    """Import `data` both ways, assert equal outputs; the streamed import's reader."""
    path = tmp_path / "snap.pickle"
    path.write_bytes(data)
    streamed, meta = _run(tmp_path, monkeypatch, path, args, True)
    unpickled, meta_std = _run(tmp_path, monkeypatch, path, args, False)
    assert meta_std["imported"].pop("reader") == "unpickler (turned off)"
    reader = meta["imported"].pop("reader")
    assert meta == meta_std
    assert streamed.keys() == unpickled.keys()
    for name, table in streamed.items():
        assert table.equals(unpickled[name]), name
    return reader


@pytest.mark.parametrize("args", WINDOWS, ids=lambda a: " ".join(a) or "whole")
@pytest.mark.parametrize("name", SNAPSHOTS)
def test_streamed_import_equals_unpickled(tmp_path, monkeypatch, name, args, capsys):
    data = pickle.dumps(SNAPSHOTS[name](), protocol=4)  # as torch.cuda.memory._dump_snapshot
    assert _same(tmp_path, monkeypatch, data, args) == "streaming"
    capsys.readouterr()


@pytest.mark.parametrize("protocol", [2, 3, 5])
def test_other_binary_protocols_stream(tmp_path, monkeypatch, protocol, capsys):
    data = pickle.dumps(_odd_stacks(), protocol=protocol)
    assert _same(tmp_path, monkeypatch, data, ["--since", "2"]) == "streaming"
    capsys.readouterr()


def test_h100_snapshot_streams(tmp_path, monkeypatch, capsys):
    data = (REPO / "tests" / "fixtures" / "h100_gpt2_small_step.pickle").read_bytes()
    assert _same(tmp_path, monkeypatch, data, []) == "streaming"
    assert _same(tmp_path, monkeypatch, data, ["--since", "100", "--until", "2000"]) == "streaming"
    capsys.readouterr()


def test_text_protocol_is_read_by_the_unpickler(tmp_path, monkeypatch, capsys):
    from profiler.cli import import_

    monkeypatch.setattr(import_, "PROGRESS_MIN_BYTES", 0)  # a file this small says nothing otherwise
    data = pickle.dumps(_snapshot(), protocol=0)
    # DICT ("d"), after a MARK: protocol 0 builds a dict from a marked run, not EMPTY_DICT.
    assert _same(tmp_path, monkeypatch, data, []) == "unpickler (opcode 0x64 at byte 1)"
    out = capsys.readouterr().out
    assert "note: read by the standard unpickler, not streamed (opcode 0x64 at byte 1)\n" in out


def test_traceback_changed_after_use_is_read_by_the_unpickler(tmp_path, monkeypatch, capsys):
    """A frames list appended to after an entry stored it (no pickler writes that, a hand can):
    the stack handle would miss the late frame, so the unpickler reads the file."""
    payload = _list_changed_after_use()
    reader = _same(tmp_path, monkeypatch, payload, [])
    assert reader.startswith("unpickler (append to a non-list")
    capsys.readouterr()


def _list_changed_after_use() -> bytes:
    """A snapshot whose one entry's frames list gets a second frame after the entry stored it."""
    frame = (
        b"}q\x01(X\x08\x00\x00\x00filenameX\x04\x00\x00\x00a.py"
        b"X\x04\x00\x00\x00lineK\x01X\x04\x00\x00\x00nameX\x01\x00\x00\x00fu"
    )
    entry = (
        b"}q\x02(X\x06\x00\x00\x00actionX\x05\x00\x00\x00allocX\x04\x00\x00\x00addrK\x10X\x04\x00\x00\x00sizeK\x08"
        b"X\x06\x00\x00\x00framesh\x00u"
    )
    return (
        b"\x80\x02}(X\x08\x00\x00\x00segments]X\x0d\x00\x00\x00device_traces]]("
        + b"]q\x00("
        + frame
        + b"e"  # frames list: memo 0, holding one frame
        + b"0"  # off the stack again
        + entry
        + b"eau"  # the entry into the trace, the trace into device_traces, both keys into the dict
        + b"h\x00h\x01a0"  # frames list again, its frame appended a second time, popped
        + b"."
    )


# Bytes no pickler writes, aimed at the reader's own bookkeeping. Each must end as the
# unpickler ends it: a one-line error (exit 2), or the same import.
_PROTO = b"\x80\x04"
_RAW = {
    "frame past the end": _PROTO + b"\x95" + (1 << 40).to_bytes(8, "little") + b"}.",
    "string past the end": _PROTO + b"\x8d" + (1 << 35).to_bytes(8, "little") + b"ab",
    "memo far past the end": _PROTO + b"}r\xff\xff\xff\x7f.",
    "memo never stored": _PROTO + b"j\x05\x00\x00\x00.",
    "setitem on a list": _PROTO + b"]NNs.",
    "append past a mark": _PROTO + b"](Na.",
    "tuple past a mark": _PROTO + b"N(\x86.",
    "a list as a key": _PROTO + b"}]Ns.",
    "unknown protocol": b"\x80\x09}.",
    "global": _PROTO + b"\x8c\x02os\x8c\x06system\x93.",
    "nested 10,000 deep": _PROTO + b"}\x8c\x08segments" + b"]" * 10_000 + b"a" * 9_999 + b"s.",
    "not UTF-8": _PROTO + b"}\x8c\x02\xff\xfeNs.",
    "truncated entry list": pickle.dumps(_snapshot(), protocol=4)[:-300],
}


@pytest.mark.parametrize("name", _RAW)
def test_raw_bytes_fail_as_the_unpickler_fails(tmp_path, monkeypatch, capsys, name):
    path = tmp_path / "raw.pickle"
    path.write_bytes(_RAW[name])
    codes = []
    for streamed in (True, False):
        monkeypatch.setenv(STREAM_ENV, "1" if streamed else "0")
        codes.append(main(["import", str(path), "--out", str(tmp_path / "runs")]))
        out = capsys.readouterr()
        codes.append(out.err)
    assert codes[0] == codes[2] == 2
    assert codes[1] == codes[3] and codes[1].count("\n") == 1


def test_reading_progress_reaches_the_end(tmp_path, monkeypatch):
    from profiler.interop.memviz import import_snapshot

    monkeypatch.setenv(STREAM_ENV, "1")
    path = tmp_path / "snap.pickle"
    path.write_bytes(pickle.dumps(_bench_snapshot(40_000), protocol=4))  # over one 16 MiB report step
    seen: list[tuple[str, int, int]] = []
    _, facts = import_snapshot(path, out_dir=tmp_path / "runs", progress=lambda *a: seen.append(a))
    reading = [done for stage, done, total in seen if stage == "reading"]
    assert facts["reader"] == "streaming"
    assert len(reading) >= 2 and reading == sorted(reading) and reading[-1] == path.stat().st_size
