"""The allocator trace tracker (profiler/capture/native), built without CUDA.

Entries go in through record_for_test, which calls the same code the allocator
calls, with the GIL released as it is inside an op.
"""

from __future__ import annotations

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
