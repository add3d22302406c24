"""Open the web dashboard (Streamlit) on a directory of traces.

Starts `streamlit run dashboard/app.py`, headless, bound to 127.0.0.1 unless
--host says otherwise, with VRAMSCOPE_TRACES set to TRACES_DIR (default: the
repository's bundled traces/ directory). Runs until interrupted (^C) or
terminated (SIGTERM, SIGHUP), and takes the server down with it.
Needs the optional dependencies: pip install 'vramscope[dashboard]'.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

from profiler.capture import signals
from profiler.errors import UsageError, VramscopeError

NAME = "dashboard"
HELP = __doc__.splitlines()[0]

REPO = Path(__file__).resolve().parents[2]
APP = REPO / "dashboard" / "app.py"
DEFAULT_TRACES = REPO / "traces"
ENV_TRACES = "VRAMSCOPE_TRACES"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "traces", metavar="TRACES_DIR", nargs="?", default=None, help=f"a directory of runs (default: {DEFAULT_TRACES})"
    )
    parser.add_argument("--port", type=_port, default=8501, metavar="N", help="the port to serve on (default: 8501)")
    parser.add_argument(
        "--host", default="127.0.0.1", help="the address to bind (default: 127.0.0.1, this machine only)"
    )


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 < value < 65536:
        raise argparse.ArgumentTypeError(f"expected a port (1-65535), got {text!r}")
    return value


def streamlit_command(traces: Path, port: int, host: str) -> tuple[list[str], dict]:
    """The command line and environment that serve the dashboard."""
    cmd = [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        str(APP),
        "--server.headless",
        "true",
        "--server.address",
        host,
        "--server.port",
        str(port),
        "--browser.gatherUsageStats",
        "false",
        "--global.developmentMode",
        "false",
        # A reader's dashboard: no Deploy button or developer menu.
        "--client.toolbarMode",
        "viewer",
    ]
    env = dict(os.environ)
    env[ENV_TRACES] = str(traces)
    # The app imports `profiler` and `dashboard` from the repository, wherever it is started.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return cmd, env


def run(args: argparse.Namespace) -> int:
    traces = Path(args.traces) if args.traces is not None else DEFAULT_TRACES
    if not traces.is_dir():
        raise UsageError(f"{traces}: no such directory of traces")
    if importlib.util.find_spec("streamlit") is None:
        raise VramscopeError("streamlit is not installed: pip install 'vramscope[dashboard]'")
    if not APP.is_file():
        raise VramscopeError(f"{APP}: the dashboard app is missing")
    cmd, env = streamlit_command(traces.resolve(), args.port, args.host)
    print(f"vramscope dashboard: {traces.resolve()} at http://{args.host}:{args.port}", file=sys.stderr)
    proc = subprocess.Popen(cmd, env=env)
    # SIGTERM and SIGHUP (kill, a closed terminal, a service manager) would end this process
    # alone, and leave the server running, orphaned and still listening: they end both.
    restore_signals = signals.install()
    try:
        return proc.wait()
    except (KeyboardInterrupt, signals.Terminated) as exc:
        _stop(proc)
        restore_signals()
        signals.redeliver(exc)  # ended as the signal would have ended it
        raise
    finally:
        restore_signals()


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
