"""The CPU capture's paths: the native tracker by default, the dispatch mode where the
tracker cannot run, and meta.json saying which ran and why.

The replay is a plain loop over events (allocated bytes rise at alloc and drop at
free_requested), sharing no code with profiler.analysis.
"""

from __future__ import annotations

import json

import pytest
import torch

import profiler
from profiler.capture import native
from profiler.trace.reader import load_trace
from workloads.model import preset
from workloads.train import build, make_batch, train_step


def _replay_peak(ev) -> int:
    cur = peak = 0
    for action, size in zip(ev["action"].astype(str), ev["size_bytes"].tolist()):
        if action == "alloc":
            cur += size
            peak = max(peak, cur)
        elif action == "free_requested":
            cur -= size
    return peak


def _train(tmp_path, name: str, steps: int = 2, **options):
    torch.manual_seed(0)
    cfg = preset("tiny")
    model, opt = build(cfg)
    batch = make_batch(cfg)
    train_step(model, opt, batch)  # optimizer state before the capture
    with profiler.profile(out=tmp_path, name=name, backend="cpu", **options) as prof:
        for _ in range(steps):
            train_step(model, opt, batch)
    meta = json.loads((prof.run_dir / "meta.json").read_text())
    return load_trace(prof.run_dir), meta, prof._parts.backend


@pytest.fixture(scope="module")
def native_run(tmp_path_factory):
    if native.load(cuda=False)[0] is None:
        pytest.skip("the tracker does not build here")
    return _train(tmp_path_factory.mktemp("native"), "native")


def test_the_native_path_is_the_default_on_cpu(native_run):
    _, meta, backend = native_run
    assert meta["capture_path"] == "native" and "capture_path_error" not in meta
    assert type(backend).__name__ == "NativeCpuBackend"


def test_the_replayed_peak_is_the_trackers_counted_peak(native_run):
    trace, meta, backend = native_run
    ev = trace.events
    assert _replay_peak(ev) == backend.peak == meta["max_allocated_bytes"] > 0
    assert int(trace.steps["max_allocated_bytes"].max()) == backend.peak
    assert len(ev) == meta["events_seen"] and meta["events_dropped"] == 0
    allocated = int(
        ev["size_bytes"][ev["action"] == "alloc"].sum() - ev["size_bytes"][ev["action"] == "free_requested"].sum()
    )
    assert allocated == backend.allocated  # still alive at the stop: never freed in the trace
    assert int((ev["action"] == "free_requested").sum()) == int((ev["action"] == "free_completed").sum())


def test_without_the_tracker_the_dispatch_mode_runs_and_meta_says_why(tmp_path, monkeypatch):
    monkeypatch.setattr(native, "_loaded", {False: (None, "compile failed: no compiler")})
    trace, meta, backend = _train(tmp_path, "fallback")
    assert meta["capture_path"] == "python"
    assert meta["capture_path_error"] == "compile failed: no compiler"
    assert type(backend).__name__ == "CpuBackend"
    assert _replay_peak(trace.events) == backend.peak == meta["max_allocated_bytes"] > 0


def test_the_python_path_when_asked(tmp_path):
    _, meta, backend = _train(tmp_path, "python", steps=1, capture_path="python")
    assert meta["capture_path"] == "python" and "capture_path_error" not in meta
    assert type(backend).__name__ == "CpuBackend"


def test_under_torchs_profiler_the_python_path_runs(tmp_path):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]):
        _, meta, _ = _train(tmp_path, "profiled", steps=1)
    assert meta["capture_path"] == "python"
    assert "torch's profiler is running" in meta["capture_path_error"]
