"""Ablations: one workload under many toggle settings, each run in its own process, tabulated.

The configurations come from workloads/suites.py. Every configuration runs as
`python -m workloads.run_one ...` in a fresh process, so that one run's allocator cache,
compiled graphs or CUDA context never leak into the next, and so that
PYTORCH_CUDA_ALLOC_CONF (read once, at CUDA start-up) can differ per run. A run that goes
out of memory, fails, crashes or times out becomes a row that says so, and the suite goes
on. The table (workloads/ablate_table.py) is written to
`<out>/ablation-<suite>-<stamp>.parquet`; `vramscope ablate` (workloads/ablate_cli.py) draws it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from workloads.ablate_table import baseline_diffs, build_table, result_row, write_table
from workloads.suites import (
    BASELINE,
    SUITES,
    Config,
    coerce,
    configurations,
    known_toggles,
    product,
    skip_reason,
    world_size,
)

# The suites' names are part of this module's interface: the runner and its matrix read as one.
__all__ = [
    "BASELINE",
    "SUITES",
    "Ablation",
    "Config",
    "baseline_diffs",
    "build_table",
    "child_env",
    "coerce",
    "command",
    "configurations",
    "known_toggles",
    "launch",
    "product",
    "result_row",
    "resolve_device",
    "run_config",
    "run_suite",
    "skip_reason",
    "world_size",
    "write_table",
]

TAIL_CHARS = 4000  # of a crashed child's output, kept for its error line


# -- one run --------------------------------------------------------------------------


def child_env(toggles: dict, env: dict | None = None) -> dict:
    """The child's environment: PYTORCH_CUDA_ALLOC_CONF from the alloc_conf toggle and nothing else.

    An inherited setting is dropped, so that the baseline runs on the allocator's defaults.
    The repository root goes first on PYTHONPATH so that `-m workloads.run_one` imports
    this checkout's workloads whatever the current directory.
    """
    env = dict(os.environ if env is None else env)
    env.pop("PYTORCH_CUDA_ALLOC_CONF", None)
    if toggles.get("alloc_conf"):
        env["PYTORCH_CUDA_ALLOC_CONF"] = str(toggles["alloc_conf"])
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def command(config: Config, *, preset: str, steps: int, out, device: str, run_name: str, result) -> list[str]:
    launcher = [sys.executable]
    if config.kind == "dist":  # one process per rank; --standalone picks a free port
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world_size(config.toggles))]
    return launcher + [
        "-m",
        "workloads.run_one",
        "--kind",
        config.kind,
        "--preset",
        preset,
        "--toggles",
        json.dumps(config.toggles),
        "--out",
        str(out),
        "--name",
        run_name,
        "--steps",
        str(steps),
        "--device",
        device,
        "--result",
        str(result),
    ]


_LIVE: set[int] = set()  # process groups of the children running now


def launch(argv: list[str], env: dict, timeout: float) -> tuple[int | None, str]:
    """Run argv; (exit code or None after `timeout` seconds, the tail of its output).

    The one place a process is started, so that tests can replace it. The child leads
    its own process group, so that a timeout also ends whatever it started (compile workers).
    """
    proc = subprocess.Popen(
        argv,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    _LIVE.add(proc.pid)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill(proc.pid)
        output, _ = proc.communicate()
        return None, output.decode(errors="replace")[-TAIL_CHARS:]
    except BaseException:
        _kill(proc.pid)
        raise
    finally:
        _LIVE.discard(proc.pid)
    return proc.returncode, output.decode(errors="replace")[-TAIL_CHARS:]


def _kill(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:  # already gone
        pass


def _kill_live() -> None:
    for pgid in list(_LIVE):
        _kill(pgid)


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def run_config(config: Config, *, preset: str, steps: int, out, device: str, run_name: str, timeout: float) -> dict:
    """The child's result dict (interface.md), or one that says why there is none."""
    if config.skip:
        return {"status": "skipped", "error": config.skip}
    with tempfile.TemporaryDirectory(prefix="vramscope-ablate-") as tmp:
        result_path = Path(tmp) / "result.json"
        argv = command(
            config, preset=preset, steps=steps, out=out, device=device, run_name=run_name, result=result_path
        )
        code, tail = launch(argv, child_env(config.toggles), timeout)
        if code is None:
            return {"status": "timeout", "error": f"no result within {timeout:g} s"}
        try:
            result = json.loads(result_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            why = _last_line(tail) or "no output"
            return {"status": "error", "error": f"the run exited with code {code} and no result: {why}"}
    if not isinstance(result, dict) or result.get("status") not in ("ok", "oom", "error"):
        return {"status": "error", "error": f"malformed result: {str(result)[:200]}"}
    return result


# -- a run's trace summary ------------------------------------------------------------


def _summary(run_dir) -> tuple[dict, str | None]:
    """The run's trace summary (profiler.analysis.summary), or {} and why not.

    A distributed job's directory holds one partition per rank: its summary is the
    job's (per-GPU figures from the largest rank).
    """
    if not run_dir:
        return {}, "no run directory in the result"
    try:
        from profiler.trace.summary_cache import load_summary

        if not (Path(run_dir) / "meta.json").is_file():
            from profiler.trace.layout import run_group_summary

            return run_group_summary(run_dir), None
        return load_summary(run_dir), None
    except Exception as exc:  # noqa: BLE001 - a row without trace facts beats no row
        return {}, f"trace summary failed: {type(exc).__name__}: {' '.join(str(exc).split())}"


# -- the suite ------------------------------------------------------------------------


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch  # only to ask; the runs happen in the children

    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass(kw_only=True, slots=True)
class Ablation:
    """What `run_suite` did: the table and where it went."""

    suite: str
    table: pd.DataFrame
    path: Path
    seconds: float
    meta: dict = dataclasses.field(default_factory=dict)


def run_suite(
    suite: str,
    *,
    preset: str = "tiny",
    steps: int = 5,
    device: str = "auto",
    out="traces",
    vary: dict | None = None,
    fixed: dict | None = None,
    timeout: float = 600.0,
    jobs: int = 1,
    progress=None,
) -> Ablation:
    """Run every configuration of the suite, one process each; write and return the table.

    jobs: runs at a time. Memory numbers are per process and stay exact; step times of
    runs that share the machine are not comparable, so keep 1 where speed matters.
    progress: an object with start(configs), done(config, row, seconds) and close(), or None.
    """
    started = time.monotonic()
    device = resolve_device(device)
    configs = configurations(suite, vary=vary, fixed=fixed, preset=preset, steps=steps, device=device)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    label = f"{suite}-vary" if vary else suite
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    one = functools.partial(
        _timed_row, preset=preset, steps=steps, out=out, device=device, label=label, timeout=timeout
    )
    table = build_table(_run_all(configs, one, jobs, progress))
    meta = {
        "suite": suite,
        "preset": preset,
        "steps": steps,
        "device": device,
        "stamp": stamp,
        "jobs": max(1, jobs),
        "vary": vary or {},
        "fixed": fixed or {},
    }
    path = write_table(table, out / f"ablation-{label}-{stamp}.parquet", meta)
    return Ablation(suite=suite, table=table, path=path, seconds=time.monotonic() - started, meta=meta)


def _timed_row(
    config: Config, *, preset: str, steps: int, out: Path, device: str, label: str, timeout: float
) -> tuple[dict, float]:
    """One configuration's table row, and the seconds its run and summary took."""
    t0 = time.monotonic()
    result = run_config(
        config,
        preset=preset,
        steps=steps,
        out=out,
        device=device,
        run_name=f"ablate-{label}-{config.name}",
        timeout=timeout,
    )
    summary, note = _summary(result.get("run_dir")) if result.get("status") == "ok" else ({}, None)
    return result_row(config, result, summary, note), time.monotonic() - t0


def _run_all(configs: list[Config], one, jobs: int, progress) -> list[dict]:
    """`one(config)` for every configuration, `jobs` at a time; the rows in the configurations' order."""
    rows: dict[int, dict] = {}
    if progress:
        progress.start(configs)
    pool = ThreadPoolExecutor(max_workers=max(1, jobs), thread_name_prefix="ablate")
    try:
        futures = {pool.submit(one, c): i for i, c in enumerate(configs)}
        for future in as_completed(futures):
            i = futures[future]
            rows[i], seconds = future.result()
            if progress:
                progress.done(configs[i], rows[i], seconds)
    except BaseException:  # Ctrl-C: the children lead their own sessions and would not see it
        pool.shutdown(wait=False, cancel_futures=True)
        _kill_live()
        raise
    finally:
        pool.shutdown(wait=True)
        if progress:
            progress.close()
    return [rows[i] for i in range(len(configs))]
