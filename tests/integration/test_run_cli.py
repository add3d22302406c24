"""`vramscope run`: an unmodified script (or -m module) profiled from the command line.

Each test runs `python -m profiler.cli run ...` in a subprocess on the CPU backend,
as a user would, and checks what the script saw, the exit code and the trace.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from profiler.trace.reader import load_trace

REPO = Path(__file__).resolve().parents[2]

# A third-party-style training script: its own model, optimizer and argparse, and an
# `--out` option of its own that must not be mistaken for vramscope's.
THIRD_PARTY = textwrap.dedent("""
    import argparse
    import json
    import os
    import sys

    import torch
    from torch import nn


    class Net(nn.Module):
        def __init__(self, width):
            super().__init__()
            self.encoder = nn.Sequential(nn.Linear(16, width), nn.ReLU(), nn.Linear(width, width))
            self.head = nn.Linear(width, 4)

        def forward(self, x):
            return self.head(self.encoder(x))


    def main():
        parser = argparse.ArgumentParser()
        parser.add_argument("--steps", type=int, default=1)
        parser.add_argument("--lr", type=float, default=0.1)
        parser.add_argument("--out", required=True)
        parser.add_argument("--mode", default="train")
        args = parser.parse_args()
        with open(args.out, "w") as f:
            json.dump(dict(argv=sys.argv, path0=sys.path[0], file=__file__, name=__name__,
                           main_is_me=sys.modules["__main__"].__dict__ is globals()), f)
        torch.manual_seed(0)
        net = Net(64)
        opt = torch.optim.Adam(net.parameters(), lr=args.lr)
        for step in range(args.steps):
            x = torch.randn(32, 16)
            loss = nn.functional.cross_entropy(net(x), torch.randint(0, 4, (32,)))
            loss.backward()
            opt.step()
            opt.zero_grad()
            print(f"step {step} loss {loss.item():.3f}", flush=True)
        if args.mode == "exit3":
            sys.exit(3)
        if args.mode == "raise":
            raise RuntimeError("the script failed")
        if args.mode == "interrupt":
            raise KeyboardInterrupt


    if __name__ == "__main__":
        main()
""")


def _vramscope(*args, cwd, timeout=180):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, "-m", "profiler.cli", *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _only_run(out: Path) -> Path:
    runs = [p for p in out.iterdir() if p.is_dir()]
    assert len(runs) == 1, runs
    return runs[0]


@pytest.fixture
def third_party(tmp_path) -> Path:
    scripts = tmp_path / "their_repo"
    scripts.mkdir()
    (scripts / "train_net.py").write_text(THIRD_PARTY)
    return scripts / "train_net.py"


def test_profiles_an_unmodified_third_party_script(tmp_path, third_party):
    out = tmp_path / "traces"
    seen = tmp_path / "seen.json"
    # cwd is not the script's directory, and the script is named by a relative path.
    rel = os.path.relpath(third_party, tmp_path)
    proc = _vramscope(
        "run",
        "--backend",
        "cpu",
        "--out",
        out,
        "--config",
        "opt=adam",
        rel,
        "--steps",
        "3",
        "--lr",
        "0.05",
        "--out",
        seen,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert [ln.split()[:2] for ln in proc.stdout.splitlines()] == [["step", "0"], ["step", "1"], ["step", "2"]]

    what = json.loads(seen.read_text())
    assert what["argv"] == [rel, "--steps", "3", "--lr", "0.05", "--out", str(seen)]
    assert what["path0"] == str(third_party.parent.resolve())
    assert what["file"] == str(third_party) and what["name"] == "__main__"
    assert what["main_is_me"] is True

    run = _only_run(out)
    assert f"trace written to {run}" in proc.stderr
    trace = load_trace(run)
    assert trace.status == "complete" and trace.backend == "cpu"
    assert trace.name == "train_net" and trace.meta["config"] == {"opt": "adam"}
    assert {"encoder", "encoder.0", "encoder.1", "encoder.2", "head"} <= set(trace.modules["module"])
    ev = trace.events
    allocated_in = set(ev[ev["action"] == "alloc"]["module"].dropna().astype(str))
    assert {"encoder.0", "encoder.2", "head"} <= allocated_in
    assert trace.steps["step"].tolist()[:3] == [0, 1, 2]
    for s in (0, 1, 2):
        phases = trace.phases[trace.phases["step"] == s]["phase"].astype(str).tolist()
        assert phases == ["forward", "backward", "optimizer"], (s, phases)
    assert (ev["category"] == "optimizer_state").any()


@pytest.mark.parametrize(
    "mode, code, status",
    [
        ("exit3", 3, "error"),
        ("raise", 1, "error"),
        ("interrupt", 130, "error"),
        ("train", 0, "complete"),
    ],
)
def test_exit_codes_pass_through(tmp_path, third_party, mode, code, status):
    out = tmp_path / "traces"
    proc = _vramscope(
        "run",
        "--backend",
        "cpu",
        "--out",
        out,
        third_party,
        "--mode",
        mode,
        "--out",
        tmp_path / "seen.json",
        cwd=tmp_path,
    )
    assert proc.returncode == code, proc.stderr
    trace = load_trace(_only_run(out))
    assert trace.status == status  # finalized in every case
    assert trace.steps["step"].tolist()[:1] == [0]
    if mode == "raise":
        # python's own traceback, from the script's frames on
        lines = proc.stderr.splitlines()
        assert lines[0] == "Traceback (most recent call last):"
        assert str(third_party) in lines[1]
        assert "RuntimeError: the script failed" in lines
        assert "profiler/cli" not in proc.stderr.split("RuntimeError")[0]
        assert trace.meta["error"] == "RuntimeError: the script failed"
    if mode == "interrupt":
        assert "KeyboardInterrupt" in proc.stderr


def test_module_gets_its_arguments(tmp_path):
    """The acceptance example: options after -m MODULE are the module's."""
    out = tmp_path / "traces"
    proc = _vramscope(
        "run",
        "--backend",
        "cpu",
        "--out",
        out,
        "-m",
        "workloads.train",
        "--preset",
        "tiny",
        "--steps",
        "2",
        "--device",
        "cpu",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert [ln.split()[:2] for ln in proc.stdout.splitlines()] == [["step", "0"], ["step", "1"]]
    trace = load_trace(_only_run(out))
    assert trace.status == "complete" and trace.name == "workloads.train"
    assert trace.steps["step"].tolist()[:2] == [0, 1]
    assert "blocks.1.mlp.fc" in set(trace.modules["module"])


def test_module_sees_what_python_dash_m_gives(tmp_path):
    pkg = tmp_path / "mypkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "job.py").write_text(
        textwrap.dedent("""
        import json, sys
        if __name__ == "__main__":
            json.dump(dict(argv=sys.argv, path0=sys.path[0], spec=__spec__.name,
                           package=__package__), open(sys.argv[-1], "w"))
    """)
    )
    out = tmp_path / "traces"
    seen = tmp_path / "seen.json"
    proc = _vramscope(
        "run", "--backend", "cpu", "--out", out, "-m", "mypkg.job", "--out", "x", "-m", "y", seen, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    what = json.loads(seen.read_text())
    assert what["argv"] == [str(pkg / "job.py"), "--out", "x", "-m", "y", str(seen)]
    assert os.path.realpath(what["path0"]) == os.path.realpath(tmp_path)
    assert (what["spec"], what["package"]) == ("mypkg.job", "mypkg")
    assert load_trace(_only_run(out)).status == "complete"


@pytest.mark.parametrize(
    "args, message",
    [
        (["run", "--backend", "cpu"], "needs a script"),
        (["run", "--backend", "cpu", "no_such_script.py", "--steps", "2"], "no such script"),
        (["run", "--config", "novalue", "SCRIPT"], "--config expects KEY=VALUE"),
        (["run", "-m"], "-m needs a module"),
        (["run", "-m", "no_such_module_xyz", "--flag"], "no module named no_such_module_xyz"),
        (["run", "--hooked-steps", "3", "SCRIPT"], "--hooked-steps: expected all or FIRST,EVERY"),
        (["run", "--hooked-steps", "3,-1", "SCRIPT"], "--hooked-steps: expected all or FIRST,EVERY"),
        (["run", "--hooked-steps", "some", "SCRIPT"], "--hooked-steps: expected all or FIRST,EVERY"),
    ],
)
def test_bad_arguments_are_one_line_errors(tmp_path, third_party, args, message):
    out = tmp_path / "traces"
    args = [third_party if a == "SCRIPT" else a for a in args]
    proc = _vramscope(*args[:1], "--out", out, *args[1:], cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("vramscope: error: "), proc.stderr
    assert message in lines[0]
    assert not out.exists()  # nothing captured


# 1,3: steps 0 and 3, and step 2, after step 1 ran unhooked code no step ran before
# (Adam's state exists from step 1 on).
@pytest.mark.parametrize("value, hooked", [("all", [True] * 5), ("1,3", [True, False, True, True, False])])
def test_hooked_steps_choose_the_steps_with_module_hooks(tmp_path, third_party, value, hooked):
    out = tmp_path / "traces"
    args = ("run", "--backend", "cpu", "--out", out, "--hooked-steps", value, third_party, "--steps", "5")
    proc = _vramscope(*args, "--out", tmp_path / "seen.json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    trace = load_trace(_only_run(out))
    assert trace.meta["capture"]["hooked_steps"] == (None if value == "all" else [1, 3])
    assert trace.steps["modules_hooked"].tolist()[:5] == hooked
    # Every step, hooked or not, has its modules and its forward.
    for s in range(5):
        phases = trace.phases[trace.phases["step"] == s]["phase"].astype(str).tolist()
        assert phases == ["forward", "backward", "optimizer"], (s, phases)
        allocs = trace.events[(trace.events["step"] == s) & (trace.events["action"] == "alloc")]
        assert {"encoder.0", "head"} <= set(allocs["module"].dropna().astype(str)), s
