"""explain() on a real allocator: a CUDA graph's private pool and a record_stream pending free.

Run with `pytest -m gpu` on a CUDA machine. Each figure is checked against torch's own view:
the end snapshot's blocks for the pool, the freed tensor's block for the pending free.
"""

from __future__ import annotations

import gc

import pytest
import torch

from profiler.analysis.explain import explain
from profiler.analysis.live import lifetimes
from profiler.trace.reader import load_trace

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _fresh_gpu():
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


def test_free_bytes_of_a_cuda_graph_pool_are_counted_apart(tmp_path):
    import profiler

    _fresh_gpu()
    net = torch.nn.Sequential(torch.nn.Linear(1024, 4096), torch.nn.GELU(), torch.nn.Linear(4096, 1024)).cuda()
    x = torch.randn(64, 1024, device="cuda")
    side = torch.cuda.Stream()
    with torch.cuda.stream(side), torch.no_grad():  # warm up off the default stream, as graphs want
        net(x)
    torch.cuda.current_stream().wait_stream(side)
    with profiler.profile(out=tmp_path, name="cuda-graph") as prof:
        graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(graph):
            y = net(x)
        for _ in range(3):
            graph.replay()
            profiler.step()
    trace = load_trace(prof.run_dir)
    lt = lifetimes(trace)
    e = explain(trace, lt, len(trace.events) - 1)  # the moment of the end snapshot
    seg = trace.segments[trace.segments["snapshot"] == "end"]
    private = seg["segment_pool"].astype(str) != "0,0"
    free = seg["state"] == "inactive"
    print("\n[cuda_graph]", e.parts, "pools:", sorted(set(seg["segment_pool"].astype(str))))
    assert private.any() and e.private_pools_known
    assert e.parts["private_pools"] == int(seg.loc[private & free, "block_bytes"].sum()) > 0
    assert e.parts["inactive_split"] + e.parts["free_segments"] == int(seg.loc[~private & free, "block_bytes"].sum())
    assert e.parts["unplaced"] == 0 and sum(e.parts.values()) == e.gap_bytes
    del graph, y
    _fresh_gpu()


def test_a_record_stream_free_is_pending_until_the_other_stream_is_done(tmp_path):
    import profiler

    _fresh_gpu()
    side = torch.cuda.Stream()
    with profiler.profile(out=tmp_path, name="record-stream") as prof:
        t = torch.empty(8 << 20, dtype=torch.uint8, device="cuda")  # 8 MiB, one block of its own size
        with torch.cuda.stream(side):
            torch.cuda._sleep(200_000_000)  # keeps the side stream busy well past the free
            t.add_(1)
        t.record_stream(side)
        del t  # free requested; the block waits for the side stream
        u = torch.empty(1 << 20, dtype=torch.uint8, device="cuda")
        torch.cuda.synchronize()
        profiler.step()
        del u
    trace = load_trace(prof.run_dir)
    lt = lifetimes(trace)
    ev = trace.events
    size = 8 << 20
    k = int(ev.index[(ev["action"] == "free_requested") & (ev["size_bytes"] == size)][0])
    e = explain(trace, lt, k)
    print("\n[record_stream]", e.parts)
    assert e.parts["pending_free"] == size
    assert sum(e.parts.values()) == e.gap_bytes
    assert e.pending["bytes"].sum() == size
