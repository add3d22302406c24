"""The tracker's CPU hook (profiler/capture/native, start_cpu): c10's CPU allocator
reports every allocation and free of the capturing thread to it.

Events are read back raw from drain(); the replay here is a plain loop over them.
"""

from __future__ import annotations

import operator
import os

import pytest
import torch

from profiler.capture import native
from profiler.capture.frames import OWN_DIR

ALLOC, FREE_REQUESTED, FREE_COMPLETED = 0, 1, 2
OWN_PREFIX = OWN_DIR + os.sep


@pytest.fixture(scope="module")
def tracker():
    module, error = native.load(cuda=False)
    if module is None:
        pytest.skip(f"the tracker does not build here: {error}")
    return module


@pytest.fixture
def capture(tracker):
    """start_cpu on this thread; stopped however the test ends."""

    def start(stacks: bool = True):
        tracker.start_cpu(stacks, 64, OWN_PREFIX)
        return tracker

    yield start
    tracker.stop_cpu()
    tracker.set_tag("")


def _events(tracker) -> tuple[dict, list[tuple]]:
    got = tracker.drain()
    rows = list(zip(*(got[k].tolist() for k in ("action", "addr", "size", "stack", "ts_us", "label"))))
    return got, rows


def _replay(rows) -> tuple[int, int, dict]:
    """(allocated, peak, {addr: size} alive): + size at alloc, - size at free_requested.
    Every free must name a live block of its size."""
    cur = peak = 0
    live: dict = {}
    for action, addr, size, *_ in rows:
        if action == ALLOC:
            assert addr not in live, addr
            live[addr] = size
            cur += size
            peak = max(peak, cur)
        elif action == FREE_REQUESTED:
            assert live.pop(addr) == size, addr
            cur -= size
    return cur, peak, live


def _stack_frames(got, sid) -> list[tuple]:
    return [got["new_frames"][f] for f in got["new_stacks"][sid]]


def test_allocations_and_frees_pair_up(capture):
    tracker = capture()
    tracker.set_tag("forward|m|")
    t = torch.empty(1000, dtype=torch.float32)
    addr = t.data_ptr()
    del t
    got, rows = _events(tracker)
    labels = tracker.labels_from(0)
    ours = [r for r in rows if r[1] == addr]
    assert [r[0] for r in ours] == [ALLOC, FREE_REQUESTED, FREE_COMPLETED]
    assert {r[2] for r in ours} == {4000}
    assert ours[1][4] == ours[2][4] and ours[0][3] >= 0 and ours[1][3] == ours[2][3] == -1  # same time; no stack
    assert {labels[r[5]] for r in ours} == {"forward|m|"}
    allocated, peak, live = _replay(rows)
    assert (allocated, peak) == tuple(tracker.cpu_counters()) and not live
    assert got["allocs"] == sum(r[0] == ALLOC for r in rows)


def test_frees_of_blocks_made_before_the_capture_are_not_events(capture):
    before = torch.empty(4096)
    tracker = capture()
    del before
    _, rows = _events(tracker)
    assert rows == [] and tuple(tracker.cpu_counters()) == (0, 0)


def test_a_stopped_capture_records_nothing(tracker, capture):
    capture()
    tracker.stop_cpu()
    t = torch.empty(1000)
    del t
    _, rows = _events(tracker)
    assert rows == []


def test_parallel_regions_keep_the_replay_exact(capture):
    """Two intra-op threads: ops that split their work over a parallel region (and some
    that allocate inside it). Every free names a live block, and the counters are the
    replay, whatever thread reported what."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        tracker = capture()
        kept = torch.randn(256, 256)
        for _ in range(3):
            a = torch.randn(512, 512)
            b = torch.sort(torch.randn(100_000))[0]
            c = torch.cumsum(a, 1) @ a
            w = torch.randn(64, 512, requires_grad=True)
            torch.nn.functional.layer_norm(w, (512,)).sum().backward()
            e = torch.nn.functional.embedding(torch.randint(0, 256, (2048,)), kept)
            del a, b, c, w, e
    finally:
        torch.set_num_threads(threads)
    _, rows = _events(tracker)
    allocated, peak, live = _replay(rows)
    assert (allocated, peak) == tuple(tracker.cpu_counters())
    assert live == {kept.data_ptr(): kept.nbytes}  # everything else was freed, and said so
    assert len(rows) > 30


def test_a_forked_child_records_nothing(capture):
    tracker = capture()
    torch.empty(10)  # made and freed before the fork
    before = tuple(tracker.cpu_counters())
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: allocate, and say whether the tracker saw it
        try:
            # No op that would start a parallel region: OpenMP's threads are not in a child.
            t = torch.empty(1 << 16)
            t[:8].add_(1)
            # What the parent recorded before the fork is there, and nothing more.
            seen = tuple(tracker.cpu_counters()) != before or len(tracker.drain()["ts_us"]) != 3
            os.write(write, b"seen" if seen else b"none")
        finally:
            os._exit(0)
    os.close(write)
    answer = os.read(read, 16)
    os.close(read)
    os.waitpid(pid, 0)
    assert answer == b"none"
    t = torch.empty(8)  # the parent still records
    _, rows = _events(tracker)
    assert [r[0] for r in rows] == [ALLOC, FREE_REQUESTED, FREE_COMPLETED, ALLOC]
    del t


def _allocate(n):
    return torch.empty(n)


def test_own_frames_are_left_out_during_the_walk(tracker, capture):
    """An allocation through a function of a file under the profiler package has the same
    stack as one made without it: the walk leaves such frames out."""
    if not tracker.reads_frames:
        pytest.skip("this build does not read Python frames")
    ours: dict = {}
    path = os.path.join(OWN_DIR, "capture", "modules.py")
    exec(compile("def call(f, *a):\n    return f(*a)\n", path, "exec"), ours)

    def allocate(wrap):
        return wrap(_allocate, 100)  # one line: only the wrapper differs

    capture()
    kept = [allocate(wrap) for wrap in (operator.call, ours["call"])]  # operator.call: C, no frame
    got, rows = _events(tracker)
    plain, hooked = (r[3] for r in rows if r[0] == ALLOC)
    assert plain == hooked >= 0
    frames = _stack_frames(got, plain)
    assert [f[2] for f in frames[:2]] == ["_allocate", "allocate"]
    assert not any(f[0].startswith(OWN_PREFIX) for f in frames)
    del kept


def _forward(x, w):
    return (x * w).relu().sum()  # the one line whose ops' backward allocates


def test_backward_allocations_take_the_stack_of_their_forward_op(tracker, capture):
    if not tracker.reads_frames:
        pytest.skip("this build does not read Python frames")
    x = torch.randn(256, requires_grad=True)
    w = torch.randn(256)
    capture()
    loss = _forward(x, w)
    loss.backward()
    got, rows = _events(tracker)
    allocs = [(r, b) for r, b in zip(rows, got["bwd_seq"].tolist()) if r[0] == ALLOC]
    forward = {r[3] for r, b in allocs if b < 0 and r[2] == 1024}
    backward = [r[3] for r, b in allocs if b >= 0]
    assert backward and forward
    assert set(backward) <= forward  # each backward allocation: a forward op's stack
    for sid in backward:
        assert _stack_frames(got, sid)[0][2] == "_forward"


def test_adopted_blocks_are_allocated_now_and_their_free_is_reported(capture):
    made_before = torch.nn.Parameter(torch.randn(300))
    tracker = capture()
    assert tracker.adopt(made_before)
    assert not tracker.adopt(made_before)  # once
    assert not tracker.adopt(torch.from_numpy(__import__("numpy").zeros(4)))  # numpy's block: not c10's
    addr = made_before.data_ptr()
    del made_before
    _, rows = _events(tracker)
    assert [(r[0], r[1], r[2], r[5]) for r in rows] == [
        (ALLOC, addr, 1200, 0),
        (FREE_REQUESTED, addr, 1200, 0),
        (FREE_COMPLETED, addr, 1200, 0),
    ]
    assert tuple(tracker.cpu_counters()) == (0, 1200)


def test_a_block_freed_on_another_thread_is_freed_there(capture):
    """A thread without the capture's debug info (gloo's, a DataLoader's, any Python
    thread) drops the last reference: the free is recorded when it happens."""
    import threading

    tracker = capture()
    box = [torch.empty(2048)]
    addr = box[0].data_ptr()
    freer = threading.Thread(target=box.clear)
    freer.start()
    freer.join()
    _, rows = _events(tracker)
    assert [(r[0], r[1], r[2]) for r in rows] == [
        (ALLOC, addr, 8192),
        (FREE_REQUESTED, addr, 8192),
        (FREE_COMPLETED, addr, 8192),
    ]
    assert tuple(tracker.cpu_counters()) == (0, 8192)
