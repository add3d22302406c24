"""`vramscope import` and `vramscope export`: torch memory snapshots in and out (CPU only).

Snapshots are built by hand as dicts. Their end state comes from a plain forward
model kept here (live blocks per segment, every gap one free block), and peaks
are checked against numbers computed from the snapshot alone: the start's
allocated bytes are the end's minus what the trace allocated plus what it freed,
and the peak is the running sum over the entries from there.
"""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from torch.cuda import _memory_viz

import profiler
from profiler.cli import main
from profiler.interop.memviz import load_snapshot, snapshot_of
from profiler.trace.reader import load_trace

MIB = 1 << 20
SMALL = 1 << 32  # a 2 MiB small-pool segment, there before the trace
LARGE = 2 << 32  # a 20 MiB segment the trace allocates


def _frames(fn):
    return [{"filename": "train.py", "line": 10, "name": fn}, {"filename": "main.py", "line": 3, "name": "main"}]


def _entry(action, addr, size, t, meta="", stacks=True, stream=0):
    e = {
        "action": action,
        "addr": addr,
        "size": size,
        "stream": stream,
        "time_us": t,
        "compile_context": "N/A",
        "user_metadata": meta,
    }
    if stacks:
        e["frames"] = _frames(f"f_{action}")
    return e


def _history():
    """(segments before the trace, live blocks before it, trace entries) of one small run."""
    segs = {SMALL: (2 * MIB, "small")}
    live = {SMALL: 4096}  # a block allocated before the trace began, alive at the end
    t = iter(range(1000, 100000, 10))
    ops = [
        ("segment_alloc", LARGE, 20 * MIB, ""),
        ("alloc", LARGE, 8 * MIB, "forward|model.fc1|activation"),
        ("alloc", LARGE + 8 * MIB, 4 * MIB, "model.fc2"),  # foreign metadata: taken as the module
        ("alloc", SMALL + 4096, 1024, "forward|model.fc1|temporary"),
        ("free_requested", LARGE, 8 * MIB, ""),
        ("free_completed", LARGE, 8 * MIB, ""),
        ("alloc", SMALL + 5120, 2048, ""),
        ("snapshot", 0, 0, ""),
        ("free_requested", SMALL + 4096, 1024, ""),
        ("free_completed", SMALL + 4096, 1024, ""),
        ("alloc", LARGE, 2 * MIB, "backward||gradient"),
        ("free_requested", SMALL + 5120, 2048, ""),  # still pending at the end
    ]
    return segs, live, [(a, addr, size, m, next(t)) for a, addr, size, m in ops]


def _end_state(segs, live, ops):
    """The dump-time segment map: a plain forward model of the history."""
    segs, live = dict(segs), {a: [s, "active_allocated"] for a, s in live.items()}
    for action, addr, size, _, _ in ops:
        if action == "segment_alloc":
            segs[addr] = (size, "large")
        elif action == "segment_free":
            del segs[addr]
        elif action == "alloc":
            live[addr] = [size, "active_allocated"]
        elif action == "free_requested":
            live[addr][1] = "active_pending_free"
        elif action == "free_completed":
            del live[addr]
    out = []
    for seg_addr, (total, kind) in sorted(segs.items()):
        blocks, at = [], seg_addr
        for a in sorted(x for x in live if seg_addr <= x < seg_addr + total):
            if a > at:
                blocks.append({"address": at, "size": a - at, "requested_size": 0, "state": "inactive", "frames": []})
            size, state = live[a]
            blocks.append(
                {"address": a, "size": size, "requested_size": size, "state": state, "frames": _frames("alloc")}
            )
            at = a + size
        if at < seg_addr + total:
            blocks.append(
                {"address": at, "size": seg_addr + total - at, "requested_size": 0, "state": "inactive", "frames": []}
            )
        alloc = sum(b["size"] for b in blocks if b["state"] == "active_allocated")
        active = sum(b["size"] for b in blocks if b["state"] != "inactive")
        out.append(
            {
                "device": 0,
                "address": seg_addr,
                "total_size": total,
                "allocated_size": alloc,
                "active_size": active,
                "requested_size": active,
                "stream": 0,
                "segment_type": kind,
                "segment_pool_id": (0, 0),
                "is_expandable": False,
                "frames": [],
                "blocks": blocks,
            }
        )
    return out


def _snapshot(drop_first=0, stacks=True):
    segs, live, ops = _history()
    end = _end_state(segs, live, ops)
    entries = [_entry(a, addr, size, t, m, stacks) for a, addr, size, m, t in ops][drop_first:]
    if not stacks:
        for s in end:
            for b in s["blocks"]:
                b.pop("frames")
    return {
        "segments": end,
        "device_traces": [entries],
        "allocator_settings": {"expandable_segments": False, "max_split_size": -1},
        "external_annotations": [],
    }


def _oracle(snap, device=0):
    """(start allocated bytes, peak allocated bytes) from the snapshot alone."""
    end = sum(
        b["size"]
        for s in snap["segments"]
        if s.get("device", 0) == device
        for b in s["blocks"]
        if b["state"] != "inactive"
    )
    entries = snap["device_traces"][device]
    start = (
        end
        - sum(e["size"] for e in entries if e["action"] == "alloc")
        + sum(e["size"] for e in entries if e["action"] == "free_completed")
    )
    cur = peak = start
    for e in entries:
        if e["action"] == "alloc":
            cur += e["size"]
        elif e["action"] == "free_completed":
            cur -= e["size"]
        peak = max(peak, cur)
    assert cur == end
    return start, peak


def _dump(tmp_path, snap, name="snap.pickle"):
    path = tmp_path / name
    path.write_bytes(pickle.dumps(snap, protocol=4))
    return path


def _import(tmp_path, path, *extra):
    """Import into a fresh folder; the loaded run."""
    n = len(list(tmp_path.glob("traces-*")))
    out = tmp_path / f"traces-{n}"
    rc = main(["import", str(path), "--out", str(out), *extra])
    assert rc == 0
    (run,) = [p for p in out.iterdir() if p.is_dir()]
    return load_trace(run)


def _events(trace):
    ev = trace.events
    return list(zip(ev["action"].astype(str), ev["addr"].tolist(), ev["size_bytes"].tolist()))


def _entries(snap, device=0):
    return [(e["action"], e["addr"], e["size"]) for e in snap["device_traces"][device]]


def _start_blocks(trace):
    seg = trace.segments
    seg = seg[seg["snapshot"].astype(str) == "start"]
    return {a: (s, str(st)) for a, s, st in zip(seg["block_addr"], seg["block_bytes"], seg["state"])}


# -- import ---------------------------------------------------------------------------
def test_import_peak_matches_snapshot_alone(tmp_path):
    snap = _snapshot()
    trace = _import(tmp_path, _dump(tmp_path, snap))
    start, peak = _oracle(snap)
    m = trace.meta
    assert m["baseline_allocated_bytes"] == start == 4096
    assert m["max_allocated_bytes"] == peak
    assert m["max_allocated_source"] == "replay"
    assert m["backend"] == "cuda" and m["device"] == "imported from snapshot"
    assert m["torch_version"] == "unknown"
    assert m["block_replay_misses"] == 0
    assert m["imported"]["rewind_misses"] == 0
    assert m["imported"]["trace_starts_mid_run"] is False
    assert m["max_reserved_bytes"] == 22 * MIB
    assert _events(trace) == _entries(snap)
    # The start map: only the small segment, with its one old block; the large one came later.
    blocks = _start_blocks(trace)
    assert blocks == {SMALL: (4096, "active_allocated"), SMALL + 4096: (2 * MIB - 4096, "inactive")}
    ev = trace.events
    assert list(ev["block_bytes"][ev["action"].astype(str) == "alloc"]) == [
        e["size"] for e in snap["device_traces"][0] if e["action"] == "alloc"
    ]
    # Tags: a vramscope tag is taken whole, anything else is the module; phase unknown then.
    assert str(ev["phase"].iloc[1]) == "forward" and str(ev["module"].iloc[1]) == "model.fc1"
    assert str(ev["module"].iloc[2]) == "model.fc2" and ev["phase"].isna().iloc[2]
    assert str(ev["category"].iloc[10]) == "gradient"
    # Stacks interned from the entries' frames; the end map kept as it was dumped.
    assert ev["stack_id"].notna().all()
    assert set(trace.frames["function"]) >= {"f_alloc", "main"}
    end = trace.segments[trace.segments["snapshot"].astype(str) == "end"]
    assert len(end) == sum(len(s["blocks"]) for s in snap["segments"])
    assert "snapshot" in set(ev["action"].astype(str))


def test_import_wrapped_ring(tmp_path):
    # The ring lost its first three entries: the large segment's allocation and two allocs,
    # whose blocks are freed (or still alive) later. They must be in the start state.
    snap = _snapshot(drop_first=3)
    snap["torch_version"] = "2.11.0+cu130"
    trace = _import(tmp_path, _dump(tmp_path, snap))
    start, peak = _oracle(snap)
    m = trace.meta
    assert m["baseline_allocated_bytes"] == start == 4096 + 8 * MIB + 4 * MIB
    assert m["max_allocated_bytes"] == peak
    assert m["torch_version"] == "2.11.0+cu130"
    assert m["imported"]["trace_starts_mid_run"] is True
    assert m["imported"]["rewind_misses"] == 0 and m["block_replay_misses"] == 0
    blocks = _start_blocks(trace)
    assert blocks[LARGE] == (8 * MIB, "active_allocated")  # freed in the trace, allocated before it
    assert blocks[LARGE + 8 * MIB] == (4 * MIB, "active_allocated")  # never touched by the trace
    assert blocks[LARGE + 12 * MIB] == (8 * MIB, "inactive")
    assert blocks[SMALL] == (4096, "active_allocated")
    # Every segment of the start map is tiled by its blocks.
    seg = trace.segments[trace.segments["snapshot"].astype(str) == "start"]
    for _addr, g in seg.groupby("segment_addr"):
        assert g["block_bytes"].sum() == g["segment_bytes"].iloc[0]
    assert _events(trace) == _entries(snap)


def test_import_ring_cut_between_free_requested_and_completed(tmp_path):
    snap = _snapshot(drop_first=5)  # starts at free_completed(LARGE): pending free at the start
    trace = _import(tmp_path, _dump(tmp_path, snap))
    start, peak = _oracle(snap)
    assert trace.meta["baseline_allocated_bytes"] == start
    assert trace.meta["max_allocated_bytes"] == peak
    assert _start_blocks(trace)[LARGE] == (8 * MIB, "active_pending_free")


def test_import_without_stacks(tmp_path):
    snap = _snapshot(stacks=False)
    trace = _import(tmp_path, _dump(tmp_path, snap))
    assert trace.events["stack_id"].isna().all()
    assert trace.frames.empty and trace.stacks.empty
    start, peak = _oracle(snap)
    assert trace.meta["max_allocated_bytes"] == peak
    assert _events(trace) == _entries(snap)


def test_import_two_devices(tmp_path, capsys):
    snap = _snapshot()
    one = [
        dict(
            s,
            device=1,
            address=s["address"] + (8 << 32),
            blocks=[dict(b, address=b["address"] + (8 << 32)) for b in s["blocks"]],
        )
        for s in snap["segments"]
        if s["address"] == SMALL
    ]
    dev1 = [
        _entry("alloc", SMALL + (8 << 32) + 4096, 512, 5),
        _entry("free_requested", SMALL + (8 << 32) + 4096, 512, 6),
        _entry("free_completed", SMALL + (8 << 32) + 4096, 512, 7),
    ]
    snap["segments"] += one
    snap["device_traces"].append(dev1)
    path = _dump(tmp_path, snap)
    trace = _import(tmp_path, path)  # default: device 0, with more entries
    assert "imported device 0" in capsys.readouterr().out
    assert _events(trace) == _entries(snap, 0)
    assert trace.meta["max_allocated_bytes"] == _oracle(snap, 0)[1]

    trace = _import(tmp_path, path, "--device", "1")
    out = capsys.readouterr().out
    assert "imported device 1 (chosen" in out and "0 (12 entries)" in out
    assert _events(trace) == _entries(snap, 1)
    # Device 1 holds the small segment as device 0 left it: 4096 + a 2048 pending free.
    assert trace.meta["baseline_allocated_bytes"] == _oracle(snap, 1)[0] == 4096 + 2048
    assert trace.meta["max_allocated_bytes"] == _oracle(snap, 1)[1] == 4096 + 2048 + 512
    assert set(trace.segments["segment_addr"]) == {SMALL + (8 << 32)}

    # More entries on device 1: it becomes the default.
    snap["device_traces"][1] = dev1 * 5
    trace = _import(tmp_path, _dump(tmp_path, snap, "b.pickle"))
    assert "imported device 1 (most trace entries" in capsys.readouterr().out
    assert len(trace.events) == 15

    assert main(["import", str(path), "--out", str(tmp_path / "t"), "--device", "7"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "device 7" in err


# -- export ---------------------------------------------------------------------------
def _check_viz(path):
    data = path.read_bytes()
    assert data[:2] == b"\x80\x04"  # pickle protocol 4
    snap = pickle.loads(data)
    assert load_snapshot(path) == snap  # plain types only: no globals
    assert "<html>" in _memory_viz.trace_plot(pickle.loads(data)).lower()
    assert "<html>" in _memory_viz.segment_plot(pickle.loads(data)).lower()
    _memory_viz.trace(pickle.loads(data))
    if snap["segments"]:
        _memory_viz.segsum(pickle.loads(data))  # checks blocks tile each segment
    return snap


def test_export_then_import_loses_nothing(tmp_path, capsys):
    snap = _snapshot(drop_first=3)
    first = _import(tmp_path, _dump(tmp_path, snap))
    out = tmp_path / "viz.pickle"
    assert main(["export", str(first.path), "--memory-viz", str(out)]) == 0
    assert "9 trace entries" in capsys.readouterr().out
    exported = _check_viz(out)
    assert _entries(exported) == _entries(snap)
    e = exported["device_traces"][0][0]
    assert set(e) >= {"action", "addr", "size", "stream", "time_us", "frames", "user_metadata"}
    assert [x["time_us"] for x in exported["device_traces"][0]] == [x["time_us"] for x in snap["device_traces"][0]]
    assert exported["device_traces"][0][0]["frames"] == _frames("f_alloc")
    # The end map came back as dumped.
    assert [
        (s["address"], s["total_size"], [(b["address"], b["size"], b["state"]) for b in s["blocks"]])
        for s in exported["segments"]
    ] == [
        (s["address"], s["total_size"], [(b["address"], b["size"], b["state"]) for b in s["blocks"]])
        for s in snap["segments"]
    ]
    assert exported["allocator_settings"] == snap["allocator_settings"]
    # Tags rebuilt from phase/module/category.
    metas = [x["user_metadata"] for x in exported["device_traces"][0]]
    assert "backward||gradient" in metas

    again = _import(tmp_path, out)
    assert _events(again) == _events(first)
    assert again.meta["baseline_allocated_bytes"] == first.meta["baseline_allocated_bytes"]
    assert again.meta["max_allocated_bytes"] == first.meta["max_allocated_bytes"]
    assert list(again.events["module"].astype(str)) == list(first.events["module"].astype(str))


def test_export_cpu_capture(tmp_path, capsys):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with profiler.profile(out=tmp_path / "cap", name="tiny", backend="cpu") as prof:
        for _ in range(3):
            loss = model(torch.randn(8, 16)).square().mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
    run = load_trace(prof.run_dir)
    assert len(run.events) > 0
    out = tmp_path / "cpu.pickle"
    assert main(["export", str(prof.run_dir), "--memory-viz", str(out)]) == 0
    exported = _check_viz(out)
    assert _entries(exported) == _events(run)
    assert any(e["frames"] for e in exported["device_traces"][0]) == run.events["stack_id"].notna().any()
    assert {e["user_metadata"].split("|")[0] for e in exported["device_traces"][0]} >= {"forward"}

    again = _import(tmp_path, out)
    assert _events(again) == _events(run)
    assert list(again.events["module"].astype(str)) == list(run.events["module"].astype(str))
    assert list(again.events["phase"].astype(str)) == list(run.events["phase"].astype(str))


def test_snapshot_of_is_plain_data(tmp_path):
    trace = _import(tmp_path, _dump(tmp_path, _snapshot()))
    snap = snapshot_of(trace)

    def walk(x):
        if isinstance(x, dict):
            assert all(type(k) is str for k in x)
            for v in x.values():
                walk(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)
        else:
            assert type(x) in (int, str, bool, float, type(None)), type(x)

    walk(snap)


# -- bad input -------------------------------------------------------------------------
class _Foreign:
    pass


@pytest.mark.parametrize(
    "payload",
    [
        b"not a pickle at all",
        b"\x80\x04\x95",  # torn
        pickle.dumps([1, 2, 3]),
        pickle.dumps({"hello": "world"}),
        pickle.dumps(_Foreign()),
        pickle.dumps({"segments": [{"address": "x"}], "device_traces": []}),
        pickle.dumps({"segments": [], "device_traces": [[{"action": "alloc", "addr": "bad"}]]}),
        pickle.dumps({"segments": [], "device_traces": [[{"action": "alloc", "stream": "s"}]]}),
    ],
    ids=["garbage", "torn", "list", "dict", "object", "bad-segment", "bad-entry", "bad-stream"],
)
def test_import_rejects_bad_pickles(tmp_path, capsys, payload):
    path = tmp_path / "bad.pickle"
    path.write_bytes(payload)
    assert main(["import", str(path), "--out", str(tmp_path / "t")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vramscope: error:") and err.count("\n") == 1
    assert not (tmp_path / "t").exists() or not any((tmp_path / "t").iterdir())


def test_import_missing_file_and_export_bad_run(tmp_path, capsys):
    assert main(["import", str(tmp_path / "nope.pickle")]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert main(["export", str(tmp_path), "--memory-viz", str(tmp_path / "x.pickle")]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_import_empty_snapshot(tmp_path):
    path = _dump(tmp_path, {"segments": [], "device_traces": [], "allocator_settings": {}})
    out = tmp_path / "traces"
    rc = main(["import", str(path), "--out", str(out)])
    # Nothing to analyse, but the run is written with its meta.
    assert rc == 0
    meta = json.loads(next(out.glob("*/meta.json")).read_text())
    assert meta["baseline_allocated_bytes"] == 0 and meta["event_count"] == 0


def test_import_segment_free_and_expandable_map(tmp_path):
    x, e = 3 << 32, 4 << 32
    snap = {
        "segments": [
            {
                "device": 0,
                "address": e,
                "total_size": 4 * MIB,
                "stream": 0,
                "segment_type": "large",
                "is_expandable": True,
                "blocks": [
                    {"address": e, "size": MIB, "requested_size": MIB, "state": "active_allocated"},
                    {"address": e + MIB, "size": 2 * MIB, "requested_size": 2 * MIB, "state": "active_allocated"},
                    {"address": e + 3 * MIB, "size": MIB, "requested_size": 0, "state": "inactive"},
                ],
            }
        ],
        "device_traces": [
            [
                _entry("free_requested", x, 512, 1),
                _entry("free_completed", x, 512, 2),
                _entry("segment_free", x, 2 * MIB, 3),  # a segment from before the trace
                _entry("segment_map", e, 2 * MIB, 4),
                _entry("alloc", e, MIB, 5),
                _entry("segment_map", e + 2 * MIB, 2 * MIB, 6),
                _entry("alloc", e + MIB, 2 * MIB, 7),
            ]
        ],
        "allocator_settings": {"expandable_segments": True},
    }
    trace = _import(tmp_path, _dump(tmp_path, snap))
    start, peak = _oracle(snap)
    m = trace.meta
    assert m["baseline_allocated_bytes"] == start == 512
    assert m["max_allocated_bytes"] == peak == 3 * MIB
    assert m["imported"]["rewind_misses"] == 0 and m["block_replay_misses"] == 0
    assert _start_blocks(trace) == {x: (512, "active_allocated"), x + 512: (2 * MIB - 512, "inactive")}
    assert m["max_reserved_bytes"] == 4 * MIB


def test_h100_snapshot_imports_to_the_allocators_own_peak(tmp_path):
    """A snapshot of one gpt2-small step taken on an H100 (torch 2.11): the imported
    trace replays to exactly the max_memory_allocated() torch reported at capture,
    and exporting then re-importing loses no event."""
    import pickle
    from pathlib import Path

    from profiler.cli import main
    from profiler.trace.reader import load_trace

    fixture = Path(__file__).resolve().parents[1] / "fixtures" / "h100_gpt2_small_step.pickle"
    facts = pickle.loads(fixture.read_bytes())["vramscope_fixture"]
    assert main(["import", str(fixture), "--out", str(tmp_path / "a"), "--name", "h100"]) == 0
    run = next((tmp_path / "a").iterdir())
    trace = load_trace(run)
    assert trace.meta["max_allocated_bytes"] == facts["max_memory_allocated"] == 10_360_304_640
    assert trace.meta["imported"]["rewind_misses"] == 0
    out = tmp_path / "x.pickle"
    assert main(["export", str(run), "--memory-viz", str(out)]) == 0
    assert main(["import", str(out), "--out", str(tmp_path / "b"), "--name", "again"]) == 0
    again = load_trace(next((tmp_path / "b").iterdir()))
    cols = ["action", "addr", "size_bytes"]
    assert again.events[cols].astype(str).equals(trace.events[cols].astype(str))
    assert again.meta["max_allocated_bytes"] == trace.meta["max_allocated_bytes"]


def test_import_too_large_to_finalize_in_free_memory_is_one_line(tmp_path, capsys, monkeypatch):
    """Where free memory cannot hold the finalized tables, the import stops with one line
    (exit 1) naming the run whose journals it wrote; a reader builds its tables from them."""
    from profiler.trace import writer as writer_module

    monkeypatch.setattr(writer_module, "available_memory_bytes", lambda: 1024)
    out = tmp_path / "traces"
    assert main(["import", str(_dump(tmp_path, _snapshot())), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    (run,) = [p for p in out.iterdir() if p.is_dir()]
    assert err.startswith("vramscope: error: finalizing ") and err.count("\n") == 1, err
    assert str(run) in err and "1.00 KiB are free" in err
    monkeypatch.undo()
    assert len(load_trace(run).events) > 0
