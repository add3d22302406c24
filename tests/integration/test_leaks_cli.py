"""`vramscope leaks` on scripts run by `vramscope run` on the CPU: a list that keeps a tensor
every step is found at its line with its exact bytes per step; a clean training loop (its
optimizer state made at the first step) has nothing flagged."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent("""
    import sys

    import torch
    from torch import nn

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4))
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    history = []
    for step in range(6):
        x = torch.randn(32, 16)
        loss = nn.functional.cross_entropy(net(x), torch.randint(0, 4, (32,)))
        loss.backward()
        opt.step()
        opt.zero_grad()
        if sys.argv[1] == "leak":
            history.append(torch.zeros(1000))  # LEAK: 1,000 float32 kept every step
""")


def _vramscope(*args, cwd):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "profiler.cli", *map(str, args)]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=240)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("leaks")
    script = root / "train_loop.py"
    script.write_text(SCRIPT)
    out = {}
    for mode in ("leak", "clean"):
        proc = _vramscope("run", "--backend", "cpu", "--out", root / mode, script, mode, cwd=root)
        assert proc.returncode == 0, proc.stderr
        (out[mode],) = [p for p in (root / mode).iterdir() if p.is_dir()]
    return out, SCRIPT.splitlines().index(next(ln for ln in SCRIPT.splitlines() if "LEAK" in ln)) + 1


def test_the_list_that_keeps_a_tensor_is_found_at_its_line(runs):
    paths, line = runs
    proc = _vramscope("leaks", paths["leak"], "--json", cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    facts = json.loads(proc.stdout)
    (leak,) = facts["leaks"]
    assert leak["site"] == f"train_loop.py:{line} <module>"
    assert (leak["bytes_per_step"], leak["exact_per_step"]) == (4000, True)
    # Appended after step 0's optimizer step: alive from the end of step 1 on.
    assert leak["first_step"] == 1 and leak["last_bytes"] == 4000 * (facts["last_step"])
    ends = facts["allocated_at_step_end_bytes"]
    assert [b - a for a, b in zip(ends, ends[1:])] == [4000] * (len(ends) - 1)
    text = _vramscope("leaks", paths["leak"], cwd=REPO).stdout
    assert f"train_loop.py:{line} <module>" in text and "4,000 B per step" in text


def test_a_clean_loop_has_nothing_flagged(runs):
    paths, _ = runs
    facts = json.loads(_vramscope("leaks", paths["clean"], "--json", cwd=REPO).stdout)
    assert facts["leaks"] == [] and facts["steps"] >= 3
    assert facts["verdict"].startswith("Nothing keeps growing")
    report = json.loads(_vramscope("report", paths["clean"], "--json", cwd=REPO).stdout)
    assert report["growth"] == facts


def test_bad_arguments_are_one_line(tmp_path):
    proc = _vramscope("leaks", tmp_path / "missing", cwd=REPO)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
