"""The allocator trace tracker (profiler/capture/native), built without CUDA.

Entries go in through record_for_test, which calls the same code the allocator
calls, with the GIL released as it is inside an op.
"""

from __future__ import annotations

import contextlib
import types

import pytest
import torch

from profiler.capture import native

ALLOC, FREE_REQUESTED, FREE_COMPLETED, SNAPSHOT = 0, 1, 2, 7


@pytest.fixture(scope="module")
def tracker():
    module, error = native.load(cuda=False)
    if module is None:
        pytest.skip(f"the tracker does not build here: {error}")
    return module


def _drained(tracker):
    got = tracker.drain()
    return got, {k: got[k].tolist() for k in ("action", "addr", "size", "stream", "label", "stack")}


def _allocate_here(tracker, addr):
    tracker.record_for_test(ALLOC, 0, addr, 512, 7)


def test_columns_labels_and_devices(tracker):
    tracker.start(0, True, 64)
    tracker.set_tag("forward|a|")
    tracker.record_for_test(ALLOC, 0, 100, 512, 7)
    tracker.record_for_test(ALLOC, 1, 200, 512, 7)  # another device: not ours
    tracker.set_tag("backward|b|")
    tracker.record_for_test(FREE_REQUESTED, 0, 100, 512, 7)
    tracker.record_for_test(FREE_COMPLETED, 0, 100, 512, 7)
    tracker.record_for_test(SNAPSHOT, 0, 0, 0, 0)  # torch's own snapshots are not events
    got, cols = _drained(tracker)
    labels = tracker.labels_from(0)
    assert cols["action"] == [ALLOC, FREE_REQUESTED, FREE_COMPLETED]
    assert cols["addr"] == [100, 100, 100] and cols["size"] == [512] * 3 and cols["stream"] == [7] * 3
    assert [labels[i] for i in cols["label"]] == ["forward|a|", "backward|b|", "backward|b|"]
    assert tracker.get_tag() == "backward|b|"
    assert got["allocs"] == 1
    assert len(tracker.drain()["ts_us"]) == 0  # drained once


def test_event_times_are_unix_microseconds_in_order(tracker):
    """Events are stamped with clock ticks, turned into Unix microseconds at each drain: each
    time lies between the system clock's readings around its event (1 ms of slack)."""
    import time

    tracker.start(0, False, 64)
    drained = []
    for batch in range(3):
        bounds = []
        for i in range(3):
            before = time.time_ns() // 1000
            tracker.record_for_test(ALLOC, 0, 1000 * batch + i, 512, 7)
            bounds.append((before, time.time_ns() // 1000))
            time.sleep(0.01)
        ts = tracker.drain()["ts_us"].tolist()
        assert all(lo - 1000 <= t <= hi + 1000 for t, (lo, hi) in zip(ts, bounds)), (ts, bounds)
        drained += ts
    assert drained == sorted(drained) and len(drained) == 9


def test_drained_columns_stay_as_they_were_while_held(tracker):
    """A drain hands its buffers to numpy without a copy, and they are reused once those
    arrays are gone: arrays still held must keep their values through later drains, and a
    drain after them must see only its own events."""
    tracker.start(0, False, 64)
    held = []
    for round_ in range(5):
        for i in range(1000 + round_):
            tracker.record_for_test(ALLOC, 0, round_ * 10_000 + i, 512, 7)
        got = tracker.drain()
        if round_ % 2 == 0:
            held.append((round_, got))  # kept: its buffers must not be reused
        else:
            assert got["addr"].tolist() == [round_ * 10_000 + i for i in range(1000 + round_)]
            del got  # given back: the next drain may fill these buffers
    for round_, got in held:
        assert got["addr"].tolist() == [round_ * 10_000 + i for i in range(1000 + round_)]
        assert got["action"].tolist() == [ALLOC] * (1000 + round_)
    tracker.stop()
    held.clear()
    assert len(tracker.drain()["addr"]) == 0


def test_stacks_read_without_the_gil(tracker):
    if not tracker.reads_frames:
        pytest.skip("this build does not read Python frames")
    tracker.start(0, True, 64)
    _allocate_here(tracker, 100)
    tracker.record_for_test(FREE_COMPLETED, 0, 100, 512, 7)
    got, cols = _drained(tracker)
    frames = got["new_frames"]
    stack = [frames[f] for f in got["new_stacks"][cols["stack"][0]]]
    assert stack[0][2] == "_allocate_here" and stack[0][0] == __file__
    assert stack[1][2] == "test_stacks_read_without_the_gil"
    assert cols["stack"][1] == cols["stack"][0]  # a free carries its allocation's stack


def test_a_new_capture_reads_stacks_afresh(tracker):
    """Frame and stack ids start again with each capture: a walk remembered from the last
    capture (the thread keeps its previous walk) must not hand out the old ids."""
    if not tracker.reads_frames:
        pytest.skip("this build does not read Python frames")
    drained = []
    for _ in range(2):
        tracker.start(0, True, 64)
        for addr in (100, 200):  # the same site twice: the second walk equals the first
            _allocate_here(tracker, addr)
        got, cols = _drained(tracker)
        drained.append((got, cols))
    for got, cols in drained:
        assert cols["stack"] == [0, 0]
        assert got["new_stacks"] and got["new_frames"][got["new_stacks"][0][0]][2] == "_allocate_here"


def test_stacks_of_sites_that_share_outer_frames(tracker):
    """Walks that differ only in their inner frames, interleaved: each keeps its own stack."""
    if not tracker.reads_frames:
        pytest.skip("this build does not read Python frames")
    tracker.start(0, True, 64)

    def site_a(addr):
        _allocate_here(tracker, addr)

    def site_b(addr):
        _allocate_here(tracker, addr)

    for i in range(3):
        site_a(10 + i)
        site_b(20 + i)
    got, cols = _drained(tracker)
    frames, stacks = got["new_frames"], got["new_stacks"]
    callers = [frames[stacks[s][1]][2] for s in cols["stack"]]
    assert callers == ["site_a", "site_b"] * 3
    assert len(set(cols["stack"])) == 2
    outer_a, outer_b = (stacks[cols["stack"][i]][3:] for i in (0, 1))
    assert outer_a == outer_b  # outside this test's frame (its line differs), the same frames


def test_stacks_keep_their_innermost_frames_and_share_an_id_when_those_agree(tracker):
    """A stack is its `max_depth` innermost frames: callers that differ only beyond them give
    one stack id, whichever chain of outer frames led there."""
    if not tracker.reads_frames:
        pytest.skip("this build does not read Python frames")
    tracker.start(0, True, 4)

    def recurse(k, addr):
        if k:
            recurse(k - 1, addr)
        else:
            _allocate_here(tracker, addr)

    def outer_a(addr):
        recurse(5, addr)

    def outer_b(addr):
        recurse(5, addr)

    outer_a(1)
    outer_b(2)
    outer_a(3)
    got, cols = _drained(tracker)
    frames, stacks = got["new_frames"], got["new_stacks"]
    assert len(set(cols["stack"])) == 1
    names = [frames[f][2] for f in stacks[cols["stack"][0]]]
    assert names == ["_allocate_here", "recurse", "recurse", "recurse"]


def test_backward_gets_the_forward_stack_of_its_node(tracker):
    if not tracker.reads_frames:
        pytest.skip("this build does not read Python frames")
    tracker.start(0, True, 64)
    x = torch.randn(3, requires_grad=True)
    y = x * 2  # makes the node whose backward allocates below
    _allocate_here(tracker, 100)  # the op's own allocation, as a CUDA op would make it

    def in_backward(grad_outputs):
        tracker.set_stacks(False)  # as on autograd's thread: no Python frames
        try:
            tracker.record_for_test(ALLOC, 0, 300, 512, 7)
        finally:
            tracker.set_stacks(True)

    y.grad_fn.register_prehook(in_backward)
    y.sum().backward()
    got, cols = _drained(tracker)
    assert cols["addr"] == [100, 300]
    assert got["bwd_seq"][1] >= 0 and got["bwd_seq"][0] == -1
    assert got["fwd_seq"][0] == got["bwd_seq"][1] + 1
    assert cols["stack"][1] == cols["stack"][0] >= 0


def test_stopped_tracker_records_nothing(tracker):
    tracker.start(0, True, 64)
    tracker.stop()
    tracker.record_for_test(ALLOC, 0, 100, 512, 7)
    assert len(tracker.drain()["ts_us"]) == 0


class _FakeCuda:
    """The few CUDA calls NativeCudaBackend makes, answered on a machine without a GPU."""

    def __init__(self, monkeypatch):
        self.allocs = 0
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext())
        monkeypatch.setattr(torch.cuda, "init", lambda: None)
        monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda d=None: None)
        monkeypatch.setattr(
            torch.cuda, "get_device_properties", lambda d: types.SimpleNamespace(name="fake", total_memory=1 << 30)
        )
        monkeypatch.setattr(torch._C, "_cuda_memoryStats", self.stats, raising=False)
        monkeypatch.setattr(torch._C, "_cuda_memorySnapshot", lambda d=None: {"segments": []}, raising=False)
        for name in ("_cuda_setMemoryMetadata", "_cuda_getMemoryMetadata"):  # replaced by the tracker's
            monkeypatch.setattr(torch._C, name, None, raising=False)

    def stats(self, index):
        return {"allocation": {"all": {"allocated": self.allocs}}}


def test_native_backend_drains_writer_columns(tracker, monkeypatch, tmp_path):
    from profiler.capture.native_cuda import NativeCudaBackend
    from profiler.trace.writer import TraceWriter

    fake = _FakeCuda(monkeypatch)
    backend = NativeCudaBackend(tracker, stacks=tracker.reads_frames)
    facts = backend.start()
    assert facts["capture_path"] == "native"
    backend.set_tag("forward|lin|")
    _allocate_here(tracker, 100)
    backend.set_tag("backward|lin|")
    tracker.record_for_test(FREE_REQUESTED, 0, 100, 512, 7)
    tracker.record_for_test(FREE_COMPLETED, 0, 100, 512, 7)
    fake.allocs = 2  # one alloc the tracker never saw: counted as dropped
    cols = backend.drain(step=3)
    assert backend.dropped == 1 and backend.events_seen == 3
    assert cols["action"].to_pylist() == ["alloc", "free_requested", "free_completed"]
    assert cols["tag"].to_pylist() == ["forward|lin|", "backward|lin|", "backward|lin|"]
    assert cols["step"].tolist() == [3, 3, 3]
    if tracker.reads_frames:
        sids = cols["stack_id"].to_pylist()
        assert sids[0] == sids[2] is not None
        frames, stacks = backend.interner.take_new()
        assert frames["function"][stacks["frame_ids"][0][0]] == "_allocate_here"
    writer = TraceWriter(tmp_path, "native", {})
    writer.append("events", cols)  # the writer takes the columns as they are
    writer.flush()
    assert backend.drain(step=4) is None
    backend.stop()


def test_native_drains_give_the_sampling_each_steps_sites(tracker, monkeypatch):
    """Markers make a label a step: across many drains (the table of labels grows), each
    drain's block events are sites of the step its last marker named, markers left out."""
    from profiler.capture.native_cuda import NativeCudaBackend
    from profiler.trace.finalize.markers import marker_tag

    _FakeCuda(monkeypatch)
    backend = NativeCudaBackend(tracker, stacks=False)
    backend.start()
    for step in range(150):
        backend.set_tag(marker_tag(step, step))
        tracker.record_for_test(ALLOC, 0, 100, 512, 7)
        backend.set_tag(f"forward|layer{step % 3}|")
        tracker.record_for_test(ALLOC, 0, 200 + step, 512, 7)
        if step % 7 == 6 or step == 149:
            sites = backend.drain(step=step)["sites"]
            first = step - len(sites["keys"]) + 1  # one block event a step, after its marker
            assert sites["steps"].tolist() == list(range(first, step + 1))
            assert sites["starts"].tolist() == list(range(len(sites["keys"])))
            assert sites["keys"].tolist() == [0] * len(sites["keys"])  # alloc (0) with no stack: (-1 + 1) * 3 + 0
            assert sites["last_step"] == step
    backend.stop()


def test_vramscope_frames_are_left_out_of_native_stacks(tracker, monkeypatch):
    """A hooked step's allocations pass through the module-hook wrapper: their stacks must
    equal the unhooked step's, as on the other paths, or every step after a hooked one
    looks new to the sampling and no template matches."""
    if not tracker.reads_frames:
        pytest.skip("this build does not read Python frames")
    import operator
    import os

    from profiler.capture.frames import OWN_DIR
    from profiler.capture.native_cuda import NativeCudaBackend

    _FakeCuda(monkeypatch)
    ours: dict = {}  # a function whose frames say they are vramscope's module-hook wrapper
    exec(compile("def call(f, *a):\n    return f(*a)\n", os.path.join(OWN_DIR, "capture", "modules.py"), "exec"), ours)
    backend = NativeCudaBackend(tracker, stacks=True)
    backend.start()

    def allocate(wrap, addr):
        wrap(_allocate_here, tracker, addr)  # one line: only the wrapper differs

    for wrap, addr in ((operator.call, 100), (ours["call"], 200)):  # operator.call: C, no frame
        allocate(wrap, addr)
    cols = backend.drain(step=0)
    plain, hooked = cols["stack_id"].to_pylist()
    assert plain is not None and plain == hooked
    backend.stop()


def test_build_failure_gives_a_reason_not_an_exception(monkeypatch, tmp_path):
    monkeypatch.setattr(native, "_loaded", {})
    monkeypatch.setenv("VRAMSCOPE_EXT_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", "false")  # a compiler that always fails
    module, error = native.load(cuda=False)
    assert module is None
    assert "frames: RuntimeError: compile failed" in error and "no frames: RuntimeError" in error


def test_auto_falls_back_to_the_python_path_and_says_why(monkeypatch):
    from profiler.capture.backend import make_backend
    from profiler.capture.cuda import CudaBackend

    _FakeCuda(monkeypatch)
    monkeypatch.setattr(native, "_loaded", {True: (None, "compile failed: no compiler")})
    monkeypatch.setattr(torch.cuda.memory, "_record_memory_history", lambda *a, **k: None)
    monkeypatch.setattr(torch._C, "_cuda_setMemoryMetadata", lambda tag: None, raising=False)
    backend = make_backend("cuda", stacks=True, max_entries=8)  # capture_path "auto" by default
    assert type(backend) is CudaBackend
    facts = backend.start()
    assert facts["capture_path"] == "python"
    assert facts["capture_path_error"] == "compile failed: no compiler"
    backend.stop()


def test_auto_takes_the_native_path_where_it_builds(tracker, monkeypatch):
    from profiler.capture.backend import make_backend
    from profiler.capture.native_cuda import NativeCudaBackend

    _FakeCuda(monkeypatch)
    monkeypatch.setattr(native, "_loaded", {True: (tracker, None)})
    backend = make_backend("cuda", stacks=tracker.reads_frames, max_entries=8)
    assert type(backend) is NativeCudaBackend
    facts = backend.start()
    assert facts["capture_path"] == "native" and "capture_path_error" not in facts
    backend.stop()


SEGMENT_ALLOC, SEGMENT_FREE, SEGMENT_MAP, SEGMENT_UNMAP = 3, 4, 5, 6
SMALL, LARGE = 2 << 20, 20 << 20
S1, S2 = 0x7F0000000000, 0x7F0000000000 + (64 << 20)


def test_segment_events_are_kept(tracker, monkeypatch):
    from profiler.capture.native_cuda import NativeCudaBackend

    _FakeCuda(monkeypatch)
    backend = NativeCudaBackend(tracker, stacks=False)
    backend.start()
    for action in (SEGMENT_ALLOC, SEGMENT_MAP, SEGMENT_UNMAP, SEGMENT_FREE):
        tracker.record_for_test(action, 0, S1, SMALL, 7)
    cols = backend.drain(step=0)
    assert cols["action"].to_pylist() == ["segment_alloc", "segment_map", "segment_unmap", "segment_free"]
    assert cols["size_bytes"].tolist() == [SMALL] * 4
    backend.stop()


def _native_steps(tracker, backend) -> list[dict]:
    """Three steps of segment and block events, drained at each step's end as a capture does."""
    steps = [
        [(SEGMENT_ALLOC, S1, SMALL), (ALLOC, S1, 1024), (ALLOC, S1 + 1024, 512)],
        [(SEGMENT_ALLOC, S2, LARGE), (ALLOC, S2, LARGE), (FREE_REQUESTED, S1, 1024), (FREE_COMPLETED, S1, 1024)],
        [(FREE_REQUESTED, S2, LARGE), (FREE_COMPLETED, S2, LARGE), (SEGMENT_FREE, S2, LARGE)],
    ]
    drained = []
    for step, events in enumerate(steps):
        for action, addr, size in events:
            tracker.record_for_test(action, 0, addr, size, 7)
        drained.append(backend.drain(step=step))
    return drained


def test_fragmentation_at_step_ends_from_the_native_stream(tracker, monkeypatch, tmp_path):
    """No snapshot after the start: each step end's segment map is replayed from the stream."""
    from fakes import base_meta

    from profiler.analysis import fragmentation, segment_map_at
    from profiler.capture.native_cuda import NativeCudaBackend
    from profiler.trace.reader import load_trace
    from profiler.trace.writer import TraceWriter

    _FakeCuda(monkeypatch)
    backend = NativeCudaBackend(tracker, stacks=False)
    backend.start()
    writer = TraceWriter(
        tmp_path, "native", base_meta(backend="cuda", device="cuda:0", max_allocated_bytes=LARGE + 1536)
    )
    for cols in _native_steps(tracker, backend):
        writer.append("events", cols)
    backend.stop()
    trace = load_trace(writer.finalize("complete"))
    frag = fragmentation(trace).query("point == 'step_end'")
    assert frag["step"].tolist() == [0, 1, 2]
    assert frag["reserved_bytes"].tolist() == [SMALL, SMALL + LARGE, SMALL]
    assert frag["allocated_bytes"].tolist() == [1536, LARGE + 512, 512]
    # At the end: S1 keeps the 512-byte block, with free space on either side of it.
    end = segment_map_at(trace, len(trace.events) - 1)
    assert end[["segment_addr", "block_addr", "size_bytes", "state"]].values.tolist() == [
        [S1, S1, 1024, "inactive"],
        [S1, S1 + 1024, 512, "active_allocated"],
        [S1, S1 + 1536, SMALL - 1536, "inactive"],
    ]
    assert frag["largest_free_block_bytes"].tolist()[-1] == SMALL - 1536


@pytest.mark.parametrize("markers", [True, False])
def test_drain_codes_give_what_numpy_works_out_from_the_columns(tracker, markers):
    """drain_codes' one pass against the same columns worked out with numpy, on a drain with
    markers, stacks the interner does not know yet and every action."""
    import numpy as np

    rng = np.random.default_rng(7)
    n, n_labels = 5000, 40
    label = rng.integers(0, n_labels, n).astype(np.int32)
    stack = rng.integers(-1, 60, n).astype(np.int32)
    action = rng.integers(0, 9, n).astype(np.int8)
    stack_of = rng.permutation(50).astype(np.int32)  # tracker stacks 50 and up: not interned yet
    marker_step = np.full(n_labels + 8, -1, np.int64)  # room beyond the known labels, as Python keeps it
    marker_step[[3, 7, 11, 19]] = [5, 6, 6, 9]
    marker_step[23] = -2  # a marker that names no step
    got = tracker.drain_codes(label, stack, action, stack_of, marker_step, n_labels, markers, 9)

    known = (stack >= 0) & (stack < len(stack_of))
    stack_id = np.where(known, stack_of[np.where(known, stack, 0)], -1)
    used = np.unique(label)
    marked = marker_step[label] if markers else np.full(n, -1)
    block = (action < 3) & (marked == -1)
    filled = np.maximum.accumulate(np.where(marked >= 0, np.arange(n), -1))
    step = np.where(filled >= 0, marked[np.maximum(filled, 0)], -1)[block]
    starts = np.flatnonzero(np.r_[True, np.diff(step) != 0]) if len(step) else np.zeros(0, int)
    assert got["stack_id"].tolist() == stack_id.tolist()
    assert got["action"].tolist() == action.astype(np.int32).tolist()
    assert got["tag_used"].tolist() == used.tolist()
    assert got["tag_code"].tolist() == np.searchsorted(used, label).tolist()
    assert got["site_keys"].tolist() == ((stack_id + 1) * 3 + action)[block].tolist()
    assert got["site_starts"].tolist() == starts.tolist()
    assert got["site_steps"].tolist() == step[starts].tolist()
    assert got["last_step"] == (int(marked[marked >= 0][-1]) if (marked >= 0).any() else -1)


def test_drain_codes_refuse_a_label_python_does_not_know_and_an_action_it_cannot_name(tracker):
    import numpy as np

    one = np.zeros(1, np.int32)
    with pytest.raises(ValueError, match="label"):
        tracker.drain_codes(one + 3, one, one.astype(np.int8), one, np.full(4, -1, np.int64), 2, True, 9)
    with pytest.raises(ValueError, match="action"):
        tracker.drain_codes(one, one, (one + 9).astype(np.int8), one, np.full(4, -1, np.int64), 2, True, 9)


def test_drain_codes_rank_each_drains_labels_alone(tracker):
    """The labels' ranks are kept between drains and reset after each, a refused one too: a
    drain's tag codes name only its own labels, however many came before it."""
    import numpy as np

    def codes(labels, n_labels):
        label = np.array(labels, np.int32)
        zeros = np.zeros(len(label), np.int32)
        got = tracker.drain_codes(
            label, zeros, zeros.astype(np.int8), zeros, np.full(n_labels, -1, np.int64), n_labels, True, 9
        )
        return got["tag_used"].tolist(), got["tag_code"].tolist()

    assert codes([5, 2, 5, 9], 10) == ([2, 5, 9], [1, 0, 1, 2])
    with pytest.raises(ValueError, match="label"):
        codes([3, 7, 12], 10)  # 3 and 7 ranked before 12 is refused
    assert codes([7, 1, 7], 10) == ([1, 7], [1, 0, 1])
    assert codes([40_000, 3], 50_000) == ([3, 40_000], [1, 0])  # more labels than any drain before


def test_markers_labels_are_forgotten_once_drained_and_their_tags_kept(tracker, monkeypatch):
    """A step a token makes a marker label a token: the tracker drops each one's text once a
    drain has read it (one drain late), while the drains hand over every marker's tag."""
    from profiler.capture.native_cuda import NativeCudaBackend
    from profiler.trace.finalize.markers import marker_tag, parse_marker

    _FakeCuda(monkeypatch)
    backend = NativeCudaBackend(tracker, stacks=False)
    backend.start()
    first = len(tracker.labels_from(0))  # labels are the process's: earlier tests made some
    seen_markers = []
    for drain in range(4):
        for step in range(drain * 5, drain * 5 + 5):
            backend.set_tag(marker_tag(step, step))
            tracker.record_for_test(ALLOC, 0, 100, 512, 7)
            backend.set_tag("forward|layer|")
            tracker.record_for_test(ALLOC, 0, 200 + step, 512, 7)
        cols = backend.drain(step=drain * 5 + 4)
        tags = cols["tag"].to_pylist()
        seen_markers += [parse_marker(t)[1] for t in tags if parse_marker(t) is not None]
    assert seen_markers == list(range(20))
    texts = tracker.labels_from(first)
    forgotten = [first + i for i, t in enumerate(texts) if t == ""]
    assert len(forgotten) == 15  # the first three drains' markers; the last drain's wait for the next
    assert all(backend._labels[i] == "" for i in forgotten)
    assert backend.get_tag() == "forward|layer|"
    backend.set_tag(marker_tag(0, 0))  # a forgotten marker's text again: a label of its own
    assert backend.get_tag() == marker_tag(0, 0)
    backend.set_tag("")
    backend.stop()
