"""What a user reads after `vramscope run`: the report, info, the runs listing and estimate --trace.

Training scripts run under `python -m profiler.cli run` in subprocesses on the CPU backend,
as a user would run them; the reading verbs run in this process (profiler.cli.main), which
is how `vramscope report` runs them too.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from profiler.cli import main
from profiler.estimate import estimate, shape_from_preset
from profiler.trace.reader import load_trace
from profiler.trace.summary_cache import load_summary

REPO = Path(__file__).resolve().parents[2]
STEPS = 3

# nanoGPT-style: token embedding, pre-norm blocks of attention and MLP, an untied head; AdamW,
# zero_grad(set_to_none=True) after each of STEPS optimizer steps. Then, by its first argument:
# raise, or sleep (inside the capture) until killed. It writes its parameter count beside itself.
TRAIN = textwrap.dedent("""
    import json
    import sys
    import time
    from pathlib import Path

    import torch
    from torch import nn


    class Block(nn.Module):
        def __init__(self, d):
            super().__init__()
            self.ln = nn.LayerNorm(d)
            self.qkv = nn.Linear(d, 3 * d)
            self.proj = nn.Linear(d, d)
            self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

        def forward(self, x):
            q, k, v = self.qkv(self.ln(x)).chunk(3, dim=-1)
            x = x + self.proj(nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True))
            return x + self.mlp(x)


    class GPT(nn.Module):
        def __init__(self, vocab=64, d=32, layers=2):
            super().__init__()
            self.wte = nn.Embedding(vocab, d)
            self.blocks = nn.ModuleList(Block(d) for _ in range(layers))
            self.head = nn.Linear(d, vocab, bias=False)

        def forward(self, idx):
            x = self.wte(idx)
            for block in self.blocks:
                x = block(x)
            return self.head(x)


    torch.manual_seed(0)
    model = GPT()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    params = list(model.parameters())
    facts = dict(numel=sum(p.numel() for p in params), tensors=len(params))
    (Path(__file__).parent / "model.json").write_text(json.dumps(facts))
    for step in range(int(sys.argv[2]) if len(sys.argv) > 2 else 3):
        idx = torch.randint(0, 64, (4, 16))
        loss = nn.functional.cross_entropy(model(idx).flatten(0, 1), idx.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    mode = sys.argv[1] if len(sys.argv) > 1 else "train"
    if mode == "raise":
        raise ValueError("the loss went to nan")
    if mode == "sleep":
        (Path(__file__).parent / "ready").write_text("")
        time.sleep(300)
""")


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=str(REPO))


def _run_cmd(out: Path, name: str, script: Path, *args) -> list[str]:
    cli = [sys.executable, "-m", "profiler.cli", "run", "--backend", "cpu", "--out", str(out), "--name", name]
    return cli + [str(script), *map(str, args)]


def _only_run(out: Path, name: str) -> Path:
    (run,) = [p for p in out.iterdir() if p.name.startswith(name + "-")]
    return run


def _cli(capsys, *args) -> tuple[int, str, str]:
    rc = main([str(a) for a in args])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """Two finished runs of the training script under one --out folder: `train` and `bad` (it raises)."""
    root = tmp_path_factory.mktemp("user")
    script = root / "train.py"
    script.write_text(TRAIN)
    out = root / "out"
    for name, mode, rc in (("train", "train", 0), ("bad", "raise", 1)):
        proc = subprocess.run(
            _run_cmd(out, name, script, mode), cwd=root, env=_env(), capture_output=True, text=True, timeout=300
        )
        assert proc.returncode == rc, proc.stderr
    facts = json.loads((root / "model.json").read_text())
    return dict(out=out, train=_only_run(out, "train"), bad=_only_run(out, "bad"), **facts)


# -- steps ----------------------------------------------------------------------------------


def test_steps_are_the_optimizer_steps_everywhere(runs, capsys):
    run = runs["train"]
    meta = json.loads((run / "meta.json").read_text())
    assert meta["steps_completed"] == STEPS
    trace = load_trace(run)
    assert len(trace.steps) == STEPS + 1  # the capture's trailing row: teardown after the last step

    rc, text, _ = _cli(capsys, "report", run, "--json")
    report = json.loads(text)
    assert rc == 0 and report["run"]["steps"] == STEPS and report["run"]["tail_step"] is True
    # The median step time is over the completed steps only: the tail's row ends the capture.
    ts = trace.steps.sort_values("step")["ts_us"].to_numpy(np.int64)[:STEPS]
    assert report["median_step_time_us"] == float(np.median(np.diff(ts)))
    rc, text, _ = _cli(capsys, "report", run)
    assert rc == 0 and f"steps {STEPS} (+ tail)" in text.splitlines()[2]

    rc, text, _ = _cli(capsys, "info", run, "--json")
    info = json.loads(text)
    assert (info["steps"], info["tail_step"], info["status"]) == (STEPS, True, "complete")
    assert load_summary(run)["steps"] == STEPS
    data = pytest.importorskip("dashboard.data", reason="the dashboard needs streamlit")
    row = data.runs_table(runs["out"]).set_index("run").loc[str(run)]
    assert (row["steps"], row["status"]) == (STEPS, "complete")


# -- a failed run ---------------------------------------------------------------------------


def test_a_failed_run_reports_its_error(runs, capsys):
    rc, text, _ = _cli(capsys, "report", runs["bad"])
    lines = text.splitlines()
    assert rc == 0 and lines[2].startswith("  status error") and f"steps {STEPS} (+ tail)" in lines[2]
    assert lines[3] == "  error: ValueError: the loss went to nan"
    rc, text, _ = _cli(capsys, "report", runs["bad"], "--json")
    assert json.loads(text)["run"]["error"] == "ValueError: the loss went to nan"
    rc, text, _ = _cli(capsys, "report", runs["train"], "--json")
    assert "error" not in json.loads(text)["run"]


# -- a run killed mid-capture -----------------------------------------------------------------


def test_a_live_run_is_running_and_a_killed_one_died(tmp_path, capsys):
    script = tmp_path / "train.py"
    script.write_text(TRAIN)
    out = tmp_path / "out"
    proc = subprocess.Popen(
        _run_cmd(out, "sleeper", script, "sleep", 2),
        cwd=tmp_path,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 240
        while not (tmp_path / "ready").exists():
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "the script never reached its sleep"
            time.sleep(0.2)
        run = _only_run(out, "sleeper")
        assert json.loads((run / "meta.json").read_text())["pid"] == proc.pid  # the capture's own process
        rc, text, _ = _cli(capsys, "report", run, "--json")
        assert rc == 0 and json.loads(text)["run"]["status"] == "running"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        if proc.stderr:
            proc.stderr.close()

    rc, text, _ = _cli(capsys, "report", run, "--json")
    report = json.loads(text)["run"]
    assert rc == 0 and report["status"] == "died" and report["steps"] == 2
    assert f"pid {proc.pid}" in report["status_note"]
    rc, text, _ = _cli(capsys, "report", run)
    assert "  status died   steps 2" in text
    rc, text, _ = _cli(capsys, "info", run, "--json")
    assert json.loads(text)["status"] == "died"
    rc, text, _ = _cli(capsys, "report", out, "--json")
    assert [(r["name"], r["status"], r["steps"]) for r in json.loads(text)] == [("sleeper", "died", 2)]


# -- a folder of runs -----------------------------------------------------------------------------


def test_report_lists_the_runs_of_a_folder(runs, capsys):
    rc, text, _ = _cli(capsys, "report", runs["out"], "--json")
    rows = json.loads(text)
    assert rc == 0 and [r["name"] for r in rows] == ["bad", "train"]  # the runs' names, in path order
    by_name = {r["name"]: r for r in rows}
    for kind, status in (("train", "complete"), ("bad", "error")):
        row = by_name[kind]
        peak = json.loads(_cli(capsys, "report", runs[kind], "--json")[1])["peak"]["allocated_bytes"]
        assert (row["status"], row["steps"], row["peak_allocated_bytes"], row["path"]) == (
            status,
            STEPS,
            peak,
            str(runs[kind]),
        )
    rc, text, _ = _cli(capsys, "report", runs["out"])
    lines = text.splitlines()
    assert rc == 0 and lines[0] == "vramscope runs: 2" and lines[1].split()[:3] == ["name", "status", "peak"]
    assert [line.split()[:2] for line in lines[2:]] == [["bad", "error"], ["train", "complete"]]
    assert lines[3].split()[-1] == str(runs["train"])


def test_report_of_a_folder_without_runs_is_one_line(tmp_path, capsys):
    rc, out, err = _cli(capsys, "report", tmp_path)
    assert rc == 2 and not out and err.count("\n") == 1 and "no vramscope runs" in err


# -- estimate --trace ------------------------------------------------------------------------------


def _rows(capsys, *args) -> dict:
    rc, text, _ = _cli(capsys, "estimate", "--trace", *args, "--json")
    assert rc == 0
    return json.loads(text)


def test_estimate_reads_parameters_and_adamw_state_from_any_run(runs, capsys):
    found = _rows(capsys, runs["train"])
    assert found["no_shape"] == "the run's config names no preset"
    rows = {(r["level"], r["name"]): r for r in found["rows"]}
    numel, tensors = runs["numel"], runs["tensors"]
    param = rows[("held", "parameter")]
    assert param["measured_bytes"] == param["predicted_bytes"] == numel * 4  # fp32 parameters, exact on CPU
    grads = rows[("held", "gradient")]
    assert grads["measured_bytes"] == grads["predicted_bytes"] == numel * 4
    moments = [rows[("state", s)] for s in ("exp_avg", "exp_avg_sq")]
    assert sum(r["measured_bytes"] for r in moments) == sum(r["predicted_bytes"] for r in moments) == 2 * numel * 4
    # Off the GPU, AdamW's step counts (a float32 scalar per parameter) are tensors the trace sees too.
    step = rows[("state", "step")]
    assert step["measured_bytes"] == step["predicted_bytes"] == 4 * tensors
    state = rows[("held", "optimizer_state")]
    assert state["measured_bytes"] == state["predicted_bytes"] == 2 * numel * 4 + 4 * tensors
    # Without a shape there is no formula: no workspace, no predicted peak, activations per module.
    assert rows[("category", "peak")]["predicted_bytes"] is None
    modules = [r for r in found["rows"] if r["level"] == "module"]
    assert modules and all(r["measured_bytes"] > 0 and r["predicted_bytes"] is None for r in modules)
    assert "blocks.0.mlp.1" in {r["name"] for r in modules}  # GELU's input and output, kept for backward
    assert not any("workspace" in r["explanation"] for r in found["rows"])


def test_estimate_with_a_shape_adds_no_cublas_workspace_on_cpu(runs, capsys):
    found = _rows(capsys, runs["train"], "--preset", "tiny")
    assert found["no_shape"] is None
    peak = next(r for r in found["rows"] if r["name"] == "peak")
    tiny = estimate(shape_from_preset("tiny"), batch=4, seq=32, workspace_bytes=0)
    assert peak["predicted_bytes"] == tiny["peak"] and tiny["workspace"] == 0
    with_workspace = estimate(shape_from_preset("tiny"), batch=4, seq=32)
    assert with_workspace["peak"] - tiny["peak"] >= 32 << 20  # what a CUDA run would add
    assert ("held", "parameter") in {(r["level"], r["name"]) for r in found["rows"]}


def test_a_run_that_could_not_be_finalized_reports_why(tmp_path, monkeypatch, capsys):
    import torch
    from torch import nn

    import profiler
    from profiler.trace.writer import TraceWriter

    def disk_full(self, status, meta_updates=None):
        raise OSError("No space left on device")

    monkeypatch.setattr(TraceWriter, "finalize", disk_full)
    model = nn.Linear(8, 8)
    opt = torch.optim.AdamW(model.parameters())
    with profiler.profile(out=tmp_path, name="full", backend="cpu") as prof:
        for _ in range(2):
            model(torch.randn(4, 8)).sum().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    capsys.readouterr()  # the capture's warning
    meta = json.loads((prof.run_dir / "meta.json").read_text())
    assert (meta["status"], meta["steps_completed"]) == ("complete", 2)
    rc, text, _ = _cli(capsys, "report", prof.run_dir)
    lines = text.splitlines()
    assert rc == 0 and lines[2].startswith("  status complete   steps 2 (+ tail)")  # zero_grad's frees
    assert lines[3] == "  finalize error: OSError: No space left on device"
