"""The CPU backend's fast path: the trace stays exact, and every allocation has a stack,
backward ones the forward stack of the op whose gradient made them.

The replay is a plain loop over events (allocated bytes rise at alloc and drop at
free_requested), sharing no code with profiler.analysis.
"""

from __future__ import annotations

import sys

import pytest
import torch

import profiler
from profiler.capture.cpu import CpuBackend
from profiler.capture.frames import PythonStacks, StackInterner
from profiler.trace.reader import load_trace
from workloads.model import preset
from workloads.train import build, make_batch, train_step

MODEL_FILE = "workloads/model.py"


def _replay_live(ev):
    """(peak bytes, {addr: (size, stack_id)} alive at the first moment of the peak)."""
    cur = peak = 0
    live: dict = {}
    at_peak: dict = {}
    rows = zip(ev["action"].astype(str), ev["addr"].tolist(), ev["size_bytes"].tolist(), ev["stack_id"].tolist())
    for action, addr, size, sid in rows:
        if action == "alloc":
            cur += size
            live[addr] = (size, sid)
            if cur > peak:
                peak, at_peak = cur, dict(live)
        elif action == "free_requested":
            cur -= size
            del live[addr]
    return peak, at_peak


def _frames_of(trace):
    files = {r.frame_id: (str(r.filename), str(r.function)) for r in trace.frames.itertuples()}
    return {int(r.stack_id): [files[f] for f in r.frame_ids] for r in trace.stacks.itertuples()}


def _varied_ops(steps: int):
    """The tiny GPT's AdamW steps, then ops that take the fast path's slower branches."""
    torch.manual_seed(0)
    cfg = preset("tiny")
    model, opt = build(cfg)
    for _ in range(steps):
        train_step(model, opt, make_batch(cfg))
    parts = [torch.randn(3, 4) for _ in range(3)]
    joined = torch.cat(parts, dim=0)  # a list argument
    out = torch.empty(0)
    torch.add(joined, 1.0, out=out)  # an out= output, resized in place
    fresh = torch.tensor([1.0, 2.0, 3.0])  # lift_fresh: a just-made input
    x = torch.zeros(8).view(2, 4).t()  # views allocate nothing
    x.add_(torch.ones(4, 2), alpha=2.0)  # a kwarg
    top = torch.randn(10).max(dim=0)  # a named-tuple output
    return joined, out, fresh, x, top


@pytest.fixture(scope="module")
def varied(tmp_path_factory):
    with profiler.profile(out=tmp_path_factory.mktemp("fast"), name="fast", backend="cpu") as prof:
        kept = _varied_ops(steps=2)
    backend = prof._parts.backend
    return load_trace(prof.run_dir), backend, kept


def test_replay_peak_is_the_trackers_peak_and_no_event_is_lost(varied):
    trace, backend, _ = varied
    ev = trace.events
    peak, _ = _replay_live(ev)
    assert peak == backend.peak == trace.meta["max_allocated_bytes"] > 0
    assert len(ev) == backend.events_seen == trace.meta["events_seen"]
    assert backend.failure is None and backend.dropped == 0 and trace.meta["events_dropped"] == 0
    allocs = int((ev["action"] == "alloc").sum())
    frees = int((ev["action"] == "free_requested").sum())
    assert frees == int((ev["action"] == "free_completed").sum())
    # What is still alive when the capture stops is the allocations never freed.
    assert (
        sum(ev["size_bytes"][ev["action"] == "alloc"]) - sum(ev["size_bytes"][ev["action"] == "free_requested"])
        == backend.allocated
    )
    assert allocs > frees > 100


def test_the_slower_branches_record_their_storages(varied):
    trace, _, (joined, out, fresh, x, top) = varied
    sizes = trace.events[trace.events["action"] == "alloc"].groupby("addr")["size_bytes"].last()
    for t in (joined, out, fresh, x, top.values, top.indices):
        addr = t.untyped_storage().data_ptr()
        assert sizes.get(addr) == t.untyped_storage().nbytes(), t


def test_backward_allocations_carry_the_forward_line_that_made_them(varied):
    trace, _, _ = varied
    ev = trace.events
    stacks = _frames_of(trace)
    bw = ev[(ev["action"] == "alloc") & (ev["phase"] == "backward")]
    assert len(bw) > 50 and bw["stack_id"].notna().all()
    at_model = [any(f.endswith(MODEL_FILE) for f, _ in stacks[int(s)]) for s in bw["stack_id"]]
    share = bw["size_bytes"][at_model].sum() / bw["size_bytes"].sum()
    assert share >= 0.95, share
    # The innermost frame in the model is a forward function's, not the loss.backward() call.
    functions = {next(fn for f, fn in stacks[int(s)] if f.endswith(MODEL_FILE)) for s in bw["stack_id"][at_model]}
    assert functions <= {"forward", "heads"}, functions


def test_bytes_with_no_stack_at_the_peak_are_at_most_5_percent(varied):
    trace, _, _ = varied
    peak, live = _replay_live(trace.events)
    unnamed = sum(size for size, sid in live.values() if sid is None or sid != sid)
    assert unnamed <= 0.05 * peak, (unnamed, peak)


def _stack_here(walker):
    return walker.stack_id(sys._getframe(1))


def test_python_stacks_intern_sites_and_skip_their_own_prefix():
    interner = StackInterner()
    skipping = _stack_here(PythonStacks(interner, skip_prefix=__file__, limit=4))
    innermost = PythonStacks(interner, skip_prefix="/nonexistent", limit=1)
    assert _stack_here(innermost) == _stack_here(innermost) is not None  # one site, one id
    three = PythonStacks(interner, skip_prefix="/nonexistent", limit=3)
    first = _stack_here(three)
    second = _stack_here(three)
    assert first != second  # the caller's lines differ
    frames, stacks = interner.take_new()
    assert frames is not None and stacks is not None
    assert sorted(len(ids) for ids in stacks["frame_ids"]) == [1, 3, 3, 4]
    files = dict(zip(frames["frame_id"], frames["filename"]))
    skipped = stacks["frame_ids"][stacks["stack_id"].index(skipping)]
    assert __file__ in files.values() and __file__ not in {files[f] for f in skipped}


def test_a_storage_seen_first_as_input_is_pre_existing_state():
    made_before = torch.randn(16)
    backend = CpuBackend(stacks=True)
    backend.start()
    try:
        backend.set_tag("forward|m|")
        y = made_before * 2
    finally:
        backend.stop()
    cols = backend.drain(0)
    rows = [(a, s, t) for a, s, t in zip(cols["action"], cols["size_bytes"], cols["tag"]) if a == "alloc"]
    assert rows == [("alloc", 64, ""), ("alloc", 64, "forward|m|")]
    assert all(sid is not None for sid in cols["stack_id"][:2])
    del y
