"""The command line under a closed pipe and a terminating signal: quiet, and nothing left behind."""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RUN = REPO / "traces" / "gpt2-small-bf16-h100"
ENV = dict(os.environ, PYTHONPATH=str(REPO))


@pytest.mark.parametrize(
    "args",
    [
        ["report", "--json", str(RUN)],
        ["report", str(RUN)],
        ["info", str(RUN)],
        ["info", "--json", str(RUN)],
        ["--help"],
        ["report", "--help"],
        ["estimate", "--help"],
        ["whatif", "--help"],
    ],
    ids=" ".join,
)
def test_a_closed_pipe_is_quiet_in_every_verb(args):
    # `vramscope report --json RUN | head -1`, with the reader gone before the first write.
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "profiler.cli", *args],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            env=ENV,
            timeout=180,
        )
    finally:
        os.close(write_end)
    assert proc.stderr == ""
    assert proc.returncode in (0, 141)  # 141: what a shell reports for a process ended by SIGPIPE


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


@pytest.mark.skipif(importlib.util.find_spec("streamlit") is None, reason="streamlit is not installed")
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads children from /proc")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=str)
def test_a_terminated_dashboard_takes_its_server_down(sig):
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "profiler.cli", "dashboard", str(REPO / "traces"), "--port", str(port)],
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    server = None
    try:
        deadline = time.monotonic() + 60
        while not _children(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        (server,) = _children(proc.pid)
        time.sleep(1)  # past the parent's handler install, into its wait for the server
        proc.send_signal(sig)
        assert proc.wait(timeout=20) == -sig  # ended by the signal, as without the server
        deadline = time.monotonic() + 15
        while _alive(server) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(server)
    finally:
        for pid in [proc.pid, *_children(proc.pid), server]:
            if pid is not None and _alive(pid):
                os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=10)
