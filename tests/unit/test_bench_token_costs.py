"""bench/token_costs.py's clocks are wired once each: every Cache.update call counted once,
whichever wrapper the round has or with no capture, and every step end either drained or clocked."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from bench import token_costs  # noqa: E402
from bench.overhead_rows import CPU_SHAPE  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def test_each_wrapper_counts_each_update_once(monkeypatch):
    from profiler.capture import hf_cache, session

    # The clocks patch these classes: put them back after the test.
    for cls, name in ((session.Profiler, "_boundary"), (session.Profiler, "_drain")):
        monkeypatch.setattr(cls, name, cls.__dict__[name])
    for name in ("measure", "__init__", "install"):
        monkeypatch.setattr(hf_cache.CacheWatch, name, hf_cache.CacheWatch.__dict__[name])
    monkeypatch.setattr(session, "make_backend", session.make_backend)
    tokens, threads = 4, torch.get_num_threads()
    try:
        got = token_costs.measure(tokens, rounds=1)
    finally:
        torch.set_num_threads(threads)  # measure() pins one thread
    assert got["parts"][token_costs.UNCAPTURED]["Cache.update"]["calls"] == CPU_SHAPE.n_layer * tokens
    for wrap in token_costs.WRAPS:
        parts = got["parts"][wrap]
        # a forward per new token (the prefill, then each decode), an update per layer and forward
        assert parts["Cache.update"]["calls"] == CPU_SHAPE.n_layer * tokens, wrap
        ends = parts["step end (no drain)"]["calls"] + parts["drain"]["calls"]
        assert tokens - 1 <= ends <= tokens + 2, wrap  # a step a forward; a drain may end a capture


def test_the_benches_of_the_plain_tracker_do_not_ask_for_the_timed_build():
    """Only bench/tracker_costs.py builds the tracker with its part clocks (VRAMSCOPE_TIME_PARTS):
    the benches that share its CPU model measure the tracker a capture really has."""
    check = "import os, bench.token_costs, bench.drain_costs, bench.soak; print(os.environ.get('VRAMSCOPE_TIME_PARTS'))"
    env = {k: v for k, v in os.environ.items() if k != "VRAMSCOPE_TIME_PARTS"}
    done = subprocess.run([sys.executable, "-c", check], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "None"


def test_bad_arguments_exit_2(capsys):
    assert token_costs.main(["--tokens", "1"]) == 2
    assert "--tokens" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert token_costs.main(["--device", "cuda"]) == 2
        assert "no CUDA device" in capsys.readouterr().err
