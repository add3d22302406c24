"""The capture never harms the job it watches: its own errors, signals, and run directories.

A full disk is faked (the trace writer's flush raises ENOSPC from a chosen step on): the
script must run every step and exit as it would without vramscope, and the trace must say
the capture failed, and why.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import profiler
from profiler.capture import distributed
from profiler.errors import RunDirectoryExists
from profiler.trace.reader import load_trace
from profiler.trace.writer import TraceWriter

REPO = Path(__file__).resolve().parents[2]
STEPS = 12
DISK_FULL_AT = 4  # the flush of this step's end is the first to fail


def _train(steps: int, on_step=None) -> int:
    """A small training loop; returns the steps it ran to the end."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    done = 0
    for step in range(steps):
        if on_step is not None:
            on_step(step)
        loss = net(torch.randn(8, 16)).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        done += 1
    return done


def _fill_disk_from(step_to_fail: int, monkeypatch):
    """A step callback that makes every trace flush raise ENOSPC from `step_to_fail` on."""
    original = TraceWriter.flush

    def full_disk(self, meta_updates=None):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def on_step(step: int) -> None:
        if step == step_to_fail:
            monkeypatch.setattr(TraceWriter, "flush", full_disk)

    return on_step, original


def test_a_full_disk_stops_the_capture_not_the_script(tmp_path, monkeypatch, capfd):
    on_step, original = _fill_disk_from(DISK_FULL_AT, monkeypatch)
    with profiler.profile(out=tmp_path, name="full", backend="cpu") as prof:
        done = _train(STEPS, on_step)
    assert done == STEPS
    assert profiler.capture.api.active() is None  # the module-level calls are no-ops again

    err = capfd.readouterr().err
    warnings = [ln for ln in err.splitlines() if ln.startswith("vramscope:")]
    assert len(warnings) == 1, err
    assert "capture stopped at step" in warnings[0] and "No space left on device" in warnings[0]

    # meta.json as the failure left it, before the writer works again at the end:
    monkeypatch.setattr(TraceWriter, "flush", original)
    meta = json.loads((prof.run_dir / "meta.json").read_text())
    assert meta["status"] == "capture_failed"
    assert meta["capture_error"] == "OSError: [Errno 28] No space left on device"
    assert prof.failure == meta["capture_error"]

    trace = load_trace(prof.run_dir)
    assert trace.status == "capture_failed"
    # What reached disk before the failure: the steps whose end flushed, none after.
    steps = trace.steps["step"].tolist()
    assert steps == list(range(len(steps))) and 0 < len(steps) <= DISK_FULL_AT


def test_after_a_failure_the_hooks_are_gone(tmp_path, monkeypatch):
    from torch.optim.optimizer import register_optimizer_step_post_hook

    on_step, _ = _fill_disk_from(1, monkeypatch)
    call_impl, backward = nn.Module._call_impl, torch.autograd.backward
    theirs = []  # the script's own global hook, after ours: torch iterates over both as ours fails
    with profiler.profile(out=tmp_path, name="gone", backend="cpu") as prof:
        handle = register_optimizer_step_post_hook(lambda opt, args, kwargs: theirs.append(1))
        try:
            assert _train(3, on_step) == 3
        finally:
            handle.remove()
        assert theirs == [1, 1, 1]
        assert not prof.capturing
        assert nn.Module._call_impl is call_impl and torch.autograd.backward is backward
        profiler.step()  # a no-op now, never an error
        profiler.mark("eval")
    assert nn.Module._call_impl is call_impl


def test_a_bug_in_a_hook_stops_the_capture(tmp_path, monkeypatch, capfd):
    from profiler.capture.modules import ModuleTracer

    def broken(self, module, args):
        raise ZeroDivisionError("a bug of ours")

    monkeypatch.setattr(ModuleTracer, "_pre_forward", broken)
    with profiler.profile(out=tmp_path, name="bug", backend="cpu") as prof:
        done = _train(3)
    assert done == 3
    trace = load_trace(prof.run_dir)
    assert trace.meta["capture_error"] == "ZeroDivisionError: a bug of ours"
    assert trace.status == "capture_failed" and len(trace.events) > 0  # what it saw before the bug
    assert capfd.readouterr().err.count("vramscope: warning: the capture stopped") == 1


# A training script that fills the disk itself, at one step, as the run goes on.
FILLS_THE_DISK = textwrap.dedent(f"""
    import errno, os, sys
    import torch
    from torch import nn
    from profiler.trace.writer import TraceWriter

    def full_disk(self, meta_updates=None):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for step in range({STEPS}):
        if step == {DISK_FULL_AT}:
            TraceWriter.flush = full_disk
        net(torch.randn(8, 16)).square().mean().backward()
        opt.step()
        opt.zero_grad()
        print("step", step, flush=True)
    sys.exit(int(sys.argv[1]))
""")


@pytest.mark.parametrize("code", [0, 3])
def test_vramscope_run_finishes_the_script_when_the_disk_fills(tmp_path, code):
    script = tmp_path / "fills.py"
    script.write_text(FILLS_THE_DISK)
    out = tmp_path / "traces"
    proc = subprocess.run(
        [sys.executable, "-m", "profiler.cli", "run", "--backend", "cpu", "--out", str(out), str(script), str(code)],
        capture_output=True,
        text=True,
        timeout=180,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        cwd=tmp_path,
    )
    assert proc.returncode == code, proc.stderr
    assert proc.stdout.split() == [w for s in range(STEPS) for w in ("step", str(s))]
    assert "Traceback" not in proc.stderr
    assert proc.stderr.count("vramscope:") == 1, proc.stderr
    (run,) = out.iterdir()
    meta = json.loads((run / "meta.json").read_text())
    assert meta["status"] == "capture_failed"
    assert meta["capture_error"] == "OSError: [Errno 28] No space left on device"

    report = subprocess.run(
        [sys.executable, "-m", "profiler.cli", "report", str(run)],
        capture_output=True,
        text=True,
        timeout=180,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )
    assert report.returncode == 0, report.stderr
    assert "capture_failed" in report.stdout
    assert "capture stopped: OSError: [Errno 28] No space left on device" in report.stdout


# -- run directories ----------------------------------------------------------------------

SINGLE_PROCESS_GROUP = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500", "RANK": "0", "WORLD_SIZE": "1"}


def test_a_job_of_one_process_gets_a_fresh_id_each_launch():
    info = distributed.rank_from_env(SINGLE_PROCESS_GROUP)
    ids = {distributed.shared_run_id("train", info, SINGLE_PROCESS_GROUP) for _ in range(4)}
    assert len(ids) == 4


def test_ranks_with_nothing_that_marks_their_launch_take_ids_of_their_own():
    # Two ranks over two nodes, with no SLURM and no torchrun run id: nothing they share tells
    # this launch from the next one with the same address and port.
    env = {"MASTER_ADDR": "node0", "MASTER_PORT": "29500", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "1"}
    info = distributed.RankInfo(rank=0, world_size=2, local_rank=0, local_world_size=1)
    assert len({distributed.shared_run_id("train", info, env) for _ in range(3)}) == 3
    unset = {**env, "TORCHELASTIC_RUN_ID": "none"}  # torchrun's default --rdzv-id marks nothing
    assert len({distributed.shared_run_id("train", info, unset) for _ in range(3)}) == 3
    launch = {**env, "TORCHELASTIC_RUN_ID": "5b1c0e"}
    assert len({distributed.shared_run_id("train", info, launch) for _ in range(3)}) == 1


def test_the_writer_never_reuses_a_run_directory(tmp_path):
    first = TraceWriter(tmp_path, "mine", {}, run_id="fixed")
    with pytest.raises(RunDirectoryExists, match="exists already"):
        TraceWriter(tmp_path, "mine", {}, run_id="fixed")
    TraceWriter(tmp_path, "mine", {}, run_id="job", subdir="rank=0")
    with pytest.raises(RunDirectoryExists):
        TraceWriter(tmp_path, "mine", {}, run_id="job", subdir="rank=0")
    TraceWriter(tmp_path, "mine", {}, run_id="job", subdir="rank=1")  # another rank's partition
    assert json.loads((first.run_dir / "meta.json").read_text())["run_id"] == "fixed"


def test_concurrent_launches_with_a_process_group_environment_stay_apart(tmp_path):
    script = tmp_path / "train_one.py"
    script.write_text(FILLS_THE_DISK.replace(f"step == {DISK_FULL_AT}", "step < 0"))
    out = tmp_path / "traces"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", **SINGLE_PROCESS_GROUP)
    cmd = [sys.executable, "-m", "profiler.cli", "run", "--backend", "cpu", "--out", str(out), "--name", "same"]
    procs = [
        subprocess.Popen(
            [*cmd, str(script), "0"], env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        for _ in range(4)
    ]
    written = set()
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr.decode()
        written.add(stderr.decode().rpartition("trace written to ")[2].strip())
    runs = sorted(out.iterdir())
    assert len(runs) == 4 and {str(r / "rank=0") for r in runs} == written
    for run in runs:
        trace = load_trace(run / "rank=0")
        assert trace.status == "complete" and trace.steps["step"].tolist()[:STEPS] == list(range(STEPS))


# -- SIGTERM and SIGHUP -------------------------------------------------------------------

# Trains until killed; says "ready" once two steps are done. MODE picks how it is captured
# and whether it handles SIGTERM itself.
UNTIL_KILLED = textwrap.dedent("""
    import signal, sys, time
    import torch
    from torch import nn

    mode = sys.argv[1]
    stop = []
    if mode == "own-handler":
        signal.signal(signal.SIGTERM, lambda signum, frame: stop.append(signum))

    def train():
        net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        step = 0
        while not stop:
            net(torch.randn(8, 16)).square().mean().backward()
            opt.step()
            opt.zero_grad()
            step += 1
            if step == 2:
                print("ready", flush=True)
            time.sleep(0.01)
        print("stopped on my own", flush=True)
        sys.exit(7)

    if mode == "api":
        import profiler
        with profiler.profile(out=sys.argv[2], name="api", backend="cpu"):
            train()
    else:
        train()
""")


def _start_until_killed(tmp_path, mode: str) -> tuple[subprocess.Popen, Path]:
    script = tmp_path / "until_killed.py"
    script.write_text(UNTIL_KILLED)
    out = tmp_path / "traces"
    if mode == "api":
        cmd = [sys.executable, str(script), mode, str(out)]
    else:
        cmd = [sys.executable, "-m", "profiler.cli", "run", "--backend", "cpu", "--out", str(out), str(script), mode]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready", proc.stderr.read() if proc.stderr else ""
    return proc, out


@pytest.mark.parametrize(
    "mode, sig", [("run", signal.SIGTERM), ("run", signal.SIGHUP), ("api", signal.SIGTERM)], ids=str
)
def test_a_terminating_signal_finalizes_then_ends_the_process_as_it_would(tmp_path, mode, sig):
    proc, out = _start_until_killed(tmp_path, mode)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == -sig, stderr  # killed by the signal itself, as without vramscope
    assert "Traceback" not in stderr
    (run,) = out.iterdir()
    trace = load_trace(run)
    assert trace.status == "terminated" and trace.meta["error"] == f"Terminated: received {sig.name}"
    assert len(trace.steps) >= 2 and not list(run.glob("*.journal"))


def test_the_scripts_own_sigterm_handler_decides(tmp_path):
    proc, out = _start_until_killed(tmp_path, "own-handler")
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 7 and "stopped on my own" in stdout, stderr
    (run,) = out.iterdir()
    assert load_trace(run).status == "error"  # sys.exit(7), as the script chose


def test_a_bug_while_tracking_an_op_stops_the_capture(tmp_path, monkeypatch, capfd):
    from profiler.capture.cpu import CpuBackend

    def broken(self, func, args, kwargs, out):
        raise KeyError("a bug of ours")

    monkeypatch.setattr(CpuBackend, "after_op", broken)  # what the dispatch mode calls on every op
    with profiler.profile(out=tmp_path, name="op", backend="cpu", capture_path="python") as prof:
        assert _train(3) == 3  # every op returned its result
    assert prof.failure == "KeyError: 'a bug of ours'"
    assert json.loads((prof.run_dir / "meta.json").read_text())["status"] == "capture_failed"
    assert capfd.readouterr().err.count("vramscope: warning: the capture stopped") == 1


def test_a_handler_the_script_sets_during_the_capture_stays(tmp_path):
    def theirs(signum, frame):
        pass

    before = signal.getsignal(signal.SIGTERM)
    with profiler.profile(out=tmp_path, name="handlers", backend="cpu"):
        assert signal.getsignal(signal.SIGTERM) is not before  # ours, while capturing
        signal.signal(signal.SIGTERM, theirs)
    try:
        assert signal.getsignal(signal.SIGTERM) is theirs
    finally:
        signal.signal(signal.SIGTERM, before)
    with profiler.profile(out=tmp_path, name="handlers", backend="cpu"):
        pass
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_run_too_large_to_finalize_in_free_memory_keeps_its_journals(tmp_path, monkeypatch, capfd):
    """Finalizing holds the whole trace in memory: where the free memory is short of what its
    events need, the profiled script is not put at risk of the OOM killer. The journals stay,
    meta.json and one line on stderr say why, and a reader builds the same tables from them."""
    from profiler.trace import writer as writer_module

    with profiler.profile(out=tmp_path / "fits", name="fits", backend="cpu") as fits:
        _train(STEPS)
    free = 1 << 10  # 1 KiB free: the hundreds of events of these steps need more
    monkeypatch.setattr(writer_module, "available_memory_bytes", lambda: free)
    with profiler.profile(out=tmp_path / "big", name="big", backend="cpu") as big:
        done = _train(STEPS)
    assert done == STEPS

    err = [ln for ln in capfd.readouterr().err.splitlines() if ln.startswith("vramscope:")]
    assert len(err) == 1 and "could not be finalized" in err[0] and "1.00 KiB are free" in err[0], err
    meta = json.loads((big.run_dir / "meta.json").read_text())
    assert meta["status"] == "complete" and meta["finalize_error"].startswith("TooLargeToFinalize: finalizing ")
    assert sorted(p.suffix for p in big.run_dir.glob("*.journal"))  # kept
    assert not list(big.run_dir.glob("*.parquet"))

    built, finalized = load_trace(big.run_dir), load_trace(fits.run_dir)
    assert len(built.events) == meta["events_seen"] > 0
    # Read from journals, the steps table keeps the partial tail after the last step too.
    assert meta["steps_completed"] == STEPS
    assert built.steps["step"].tolist()[:STEPS] == finalized.steps["step"].tolist()[:STEPS] == list(range(STEPS))
    # Both runs did the same work: the same allocations, by size and category.
    key = ["action", "size_bytes", "category"]
    assert (
        built.events[key].astype(str).value_counts().to_dict()
        == finalized.events[key].astype(str).value_counts().to_dict()
    )


def test_finalizing_checks_free_memory_against_the_events_written(tmp_path, monkeypatch):
    from profiler.trace import writer as writer_module

    free = writer_module.available_memory_bytes()
    assert free is None or free > 0  # this machine's MemAvailable (None off Linux)
    w = TraceWriter(tmp_path, "x", {})
    w.append("events", {"ts_us": [1, 2], "action": ["alloc", "free_requested"], "addr": [1, 1], "size_bytes": [8, 8]})
    w.flush()
    assert w.rows_written["events"] == 2
    need = 2 * writer_module.FINALIZE_BYTES_PER_EVENT
    enough = int(need / writer_module.FINALIZE_MEMORY_SHARE) + 1
    monkeypatch.setattr(writer_module, "available_memory_bytes", lambda: enough)
    writer_module.check_memory_for(2)  # just fits
    monkeypatch.setattr(writer_module, "available_memory_bytes", lambda: need)
    with pytest.raises(writer_module.TooLargeToFinalize, match="finalizing 2 events needs about"):
        writer_module.check_memory_for(2)
    monkeypatch.setattr(writer_module, "available_memory_bytes", lambda: None)  # not Linux: no check
    writer_module.check_memory_for(10**12)
