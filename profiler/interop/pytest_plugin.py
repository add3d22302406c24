"""pytest plugin: memory budgets and memory regression checks for tests.

Load it with ``-p profiler.pytest_plugin`` (an alias of ``profiler.interop.pytest_plugin``), or,
once vramscope is installed, through its ``pytest11`` entry point named ``vramscope``.

Budgets
    ``@pytest.mark.vram_limit("2 GiB")`` runs the test body under ``profiler.profile``
    (backend "auto": CUDA allocator history on a GPU machine, CPU storage tracking
    otherwise) and fails the test when its peak exceeds the budget. The budget is an
    int (bytes) or a string: binary units ``KiB MiB GiB TiB`` (and the bare ``K M G T``),
    decimal units ``kB MB GB TB`` (``"1.5GB"`` is 1.5e9 bytes), or ``B``.

What "peak" means
    The trace's ``meta.json`` ``max_allocated_bytes`` over the test body (setup and
    teardown of fixtures are not profiled). Memory already alive when the body starts
    counts: on CUDA the allocator's peak is reset at the start, so the peak includes
    everything allocated then (a fixture's model, tensors of earlier tests still alive);
    on CPU a storage made before the body counts from the moment the body first uses
    it (a module's parameters at its first call). No baseline is subtracted: the
    number is what the device must hold, which is what a budget is about.

The failure message names the peak and the budget (human units and exact bytes), the
top modules and the top allocation stacks alive at the peak, and the trace's path.
Traces go under ``--vram-traces DIR`` (kept) or pytest's temporary directory.

Regressions
    ``--vram-baseline FILE`` profiles every test (those marked ``vram_off`` excepted)
    and compares its peak with the one stored in FILE for the same test and backend:
    a peak more than ``--vram-regression PCT`` percent (default 10) above the stored
    one fails the test. ``--vram-update-baseline`` writes the peaks measured in this
    session into FILE instead (creating it; other tests' entries are kept) and checks
    no regression. FILE is JSON: ``{"version": 1, "tests": {nodeid: {backend: bytes}}}``.

pytest-xdist
    Each worker profiles its own tests. The peaks travel to the controller inside the
    test reports (``user_properties``: vram_peak_bytes, vram_backend, vram_trace), and
    only the controller writes FILE, once, at the end of the session: a read-modify-write
    under an exclusive lock on ``FILE.lock``, replaced atomically, so that concurrent
    sessions never lose each other's entries or leave a torn file.

Nothing here imports torch before the first profiled test, nor pandas and the analysis
before a failure message needs them.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import pytest

from profiler.trace.files import atomic_write
from profiler.units import exact_bytes, human_bytes, parse_size  # noqa: F401 (part of this module's API)

BASELINE_VERSION = 1
DEFAULT_REGRESSION_PCT = 10.0
_TOP = 5
_STACK_DEPTH = 4
# Frames from these places say little about which test code allocated: shown only if nothing else.
_NOISE = ("/_pytest/", "/pytest/", "/pluggy/", "/torch/", "/xdist/", "/execnet/", "/runpy.py", "<frozen ")
_PEAKS_KEY = pytest.StashKey[dict]()


# -- registration -----------------------------------------------------------------------


def pytest_addoption(parser):
    group = parser.getgroup("vramscope", "memory budgets and regressions (vramscope)")
    group.addoption(
        "--vram-traces",
        metavar="DIR",
        default=None,
        help="write the traces of profiled tests under DIR (default: pytest's temporary directory)",
    )
    group.addoption(
        "--vram-baseline",
        metavar="FILE",
        default=None,
        help="profile every test and compare its peak with the one stored in FILE (JSON)",
    )
    group.addoption(
        "--vram-regression",
        metavar="PCT",
        type=float,
        default=None,
        help=f"with --vram-baseline: fail a test whose peak grew more than PCT %% "
        f"over its stored peak (default {DEFAULT_REGRESSION_PCT:g})",
    )
    group.addoption(
        "--vram-update-baseline",
        action="store_true",
        default=False,
        help="with --vram-baseline: store this session's peaks in FILE (no regression check)",
    )


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "vram_limit(budget): profile the test body with vramscope and fail it when "
        "its peak allocated memory exceeds budget (bytes, or '512 MiB', '2 GiB', '1.5GB')",
    )
    config.addinivalue_line("markers", "vram_off: do not profile this test under --vram-baseline")
    opt = config.option
    if opt.vram_baseline is None and (opt.vram_update_baseline or opt.vram_regression is not None):
        raise pytest.UsageError("--vram-update-baseline and --vram-regression need --vram-baseline FILE")
    if opt.vram_regression is not None and (not math.isfinite(opt.vram_regression) or opt.vram_regression < 0):
        raise pytest.UsageError(f"--vram-regression: expected a percentage >= 0, got {opt.vram_regression}")
    stored = {}
    if opt.vram_baseline and not opt.vram_update_baseline:
        stored = read_baseline(opt.vram_baseline).get("tests", {})
    state = config.stash[_PEAKS_KEY] = {"stored": stored, "measured": {}}
    config.pluginmanager.register(_Collector(state), "vramscope-collector")


# -- the baseline file ------------------------------------------------------------------


def read_baseline(path) -> dict:
    """The baseline's contents ({"version", "tests"}); an empty one when FILE does not exist."""
    p = Path(path)
    if not p.exists():
        return {"version": BASELINE_VERSION, "tests": {}}
    try:
        data = json.loads(p.read_text() or "{}")
    except (OSError, ValueError) as e:
        raise pytest.UsageError(f"--vram-baseline {path}: not a readable JSON baseline ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("tests", {}), dict):
        raise pytest.UsageError(f"--vram-baseline {path}: expected an object with a 'tests' object")
    data.setdefault("tests", {})
    return data


def update_baseline(path, measured: dict) -> None:
    """Merge {nodeid: {backend: bytes}} into FILE: locked read-modify-write, atomic replace."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with _locked(p.with_name(p.name + ".lock")):
        data = read_baseline(p)
        for nodeid, peaks in measured.items():
            data["tests"].setdefault(nodeid, {}).update(peaks)
        data["version"] = BASELINE_VERSION
        data["tests"] = dict(sorted(data["tests"].items()))
        atomic_write(p, json.dumps(data, indent=1, sort_keys=False) + "\n")


class _locked:
    """An exclusive advisory lock on a file (fcntl; msvcrt on Windows)."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        self.f = open(self.path, "a+")
        try:
            import fcntl

            fcntl.flock(self.f.fileno(), fcntl.LOCK_EX)
        except ImportError:  # Windows
            import msvcrt

            msvcrt.locking(self.f.fileno(), msvcrt.LK_LOCK, 1)
        return self

    def __exit__(self, *exc):
        self.f.close()  # closing releases the lock
        return False


# -- profiling a test -------------------------------------------------------------------


def _budget(item):
    marker = item.get_closest_marker("vram_limit")
    if marker is None:
        return None
    args = list(marker.args) or [marker.kwargs.get("budget")]
    if len(args) != 1 or args[0] is None:
        raise pytest.fail.Exception(
            f"vram_limit: expected one budget, e.g. @pytest.mark.vram_limit('2 GiB'); got {marker.args!r}",
            pytrace=False,
        )
    try:
        return parse_size(args[0])
    except ValueError as e:
        raise pytest.fail.Exception(f"vram_limit: {e}", pytrace=False) from None


def _trace_root(config) -> Path:
    if config.option.vram_traces:
        return Path(config.option.vram_traces)
    return config._tmp_path_factory.getbasetemp() / "vramscope"


def _run_name(item) -> str:
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", item.nodeid).strip("_")
    return name[-120:] or "test"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    config = item.config
    budget = _budget(item)
    baseline = config.option.vram_baseline and item.get_closest_marker("vram_off") is None
    if budget is None and not baseline:
        return (yield)

    from profiler.capture.session import profile
    from profiler.trace.meta import read_meta

    prof = profile(out=str(_trace_root(config)), name=_run_name(item), config={"pytest_nodeid": item.nodeid})
    with prof:
        result = yield  # the body's own failure propagates: no budget check then
    meta = read_meta(prof.run_dir)
    peak = int(meta.get("max_allocated_bytes") or 0)
    backend = str(meta.get("backend"))
    item.user_properties += [("vram_peak_bytes", peak), ("vram_backend", backend), ("vram_trace", str(prof.run_dir))]
    problems = []
    if budget is not None and peak > budget:
        problems.append(
            f"peak {exact_bytes(peak)} exceeds the budget {exact_bytes(budget)} by {exact_bytes(peak - budget)}"
        )
    if baseline and not config.option.vram_update_baseline:
        stored = config.stash[_PEAKS_KEY]["stored"].get(item.nodeid, {}).get(backend)
        pct = config.option.vram_regression
        pct = DEFAULT_REGRESSION_PCT if pct is None else pct
        if stored is not None and peak > int(stored) * (1 + pct / 100):
            growth = 100 * (peak - int(stored)) / int(stored) if int(stored) else math.inf
            problems.append(
                f"peak {exact_bytes(peak)} grew {growth:.1f}% over the baseline's "
                f"{exact_bytes(int(stored))} ({backend}; allowed: +{pct:g}%, "
                f"baseline {config.option.vram_baseline})"
            )
    if problems:
        raise pytest.fail.Exception(_failure(item, problems, prof.run_dir, peak), pytrace=False)
    return result


def _failure(item, problems: list[str], run_dir, peak: int) -> str:
    lines = [f"vramscope: {item.nodeid}: {p}" for p in problems]
    try:
        lines += peak_report(run_dir)
    except Exception as e:  # the verdict matters more than its details
        lines.append(f"(no breakdown: {type(e).__name__}: {e})")
    lines.append(f"trace: {run_dir}  (vramscope report {run_dir})")
    return "\n".join(lines)


def peak_report(run_dir, top: int = _TOP) -> list[str]:
    """The top modules and the top allocation stacks alive at the peak, as text lines."""
    from profiler.analysis.live import alive_at_peak, breakdown, lifetimes
    from profiler.analysis.modules import module_table
    from profiler.trace.reader import load_trace

    trace = load_trace(run_dir)
    lt = lifetimes(trace)
    lines = []
    mods = module_table(trace, lt=lt)
    if len(mods):
        mods = (
            mods[mods["peak_contribution_bytes"] > 0]
            .sort_values("peak_contribution_bytes", ascending=False, kind="stable")
            .head(top)
        )
    if len(mods):
        lines.append("top modules at the peak:")
        width = max(len(str(m or "(root)")) for m in mods["module"])
        for m, cls, b in zip(mods["module"], mods["class_name"], mods["peak_contribution_bytes"]):
            lines.append(f"  {str(m or '(root)'):<{width}}  {str(cls or ''):<16} {exact_bytes(int(b))}")
    else:
        lines.append("top modules at the peak: none (no module was running)")
    live = alive_at_peak(trace, lt)
    by_stack = breakdown(live, "stack_id").head(top)
    names = {
        int(f): (str(file), int(line), str(fn))
        for f, file, line, fn in zip(
            trace.frames["frame_id"], trace.frames["filename"], trace.frames["line"], trace.frames["function"]
        )
    }
    chains = {int(s): list(f) for s, f in zip(trace.stacks["stack_id"], trace.stacks["frame_ids"]) if f is not None}
    lines.append("top stacks at the peak (innermost frame first):")
    for sid, b, n in zip(by_stack["stack_id"], by_stack["total_bytes"], by_stack["count"]):
        lines.append(f"  {exact_bytes(int(b))} in {int(n)} block{'s' if n != 1 else ''}")
        chain = [names[f] for f in chains.get(int(sid), []) if f in names] if sid is not None else []
        shown = [f for f in chain if not any(s in f[0] for s in _NOISE)] or chain
        if not shown:
            lines.append("    (no stack: memory alive before the capture, or untracked)")
        for file, line, fn in shown[:_STACK_DEPTH]:
            lines.append(f"    {_short(file)}:{line} {fn}")
    return lines


def _short(file: str) -> str:
    try:
        return os.path.relpath(file)
    except ValueError:
        return file


# -- collecting peaks (the controller, or the only process) -------------------------------


class _Collector:
    """Gathers each profiled test's peak from its report: on the controller under xdist."""

    def __init__(self, state: dict):
        self.state = state

    def pytest_runtest_logreport(self, report):
        if report.when != "call":
            return
        props = dict(report.user_properties)
        if "vram_peak_bytes" in props:
            self.state["measured"].setdefault(report.nodeid, {})[str(props["vram_backend"])] = int(
                props["vram_peak_bytes"]
            )


def pytest_sessionfinish(session):
    config = session.config
    if hasattr(config, "workerinput"):  # an xdist worker: the controller writes the file
        return
    measured = config.stash.get(_PEAKS_KEY, {}).get("measured")
    if config.option.vram_update_baseline and measured:
        update_baseline(config.option.vram_baseline, measured)


def pytest_terminal_summary(terminalreporter, config):
    if hasattr(config, "workerinput"):
        return
    state = config.stash.get(_PEAKS_KEY, None)
    if not state or not state["measured"]:
        return
    tr = terminalreporter
    tr.section("vramscope peaks", sep="-")
    rows = sorted(((max(p.values()), nodeid, p) for nodeid, p in state["measured"].items()), reverse=True)
    for _, nodeid, p in rows[:10]:
        tr.write_line("  ".join(f"{exact_bytes(b)} [{be}]" for be, b in sorted(p.items())) + f"  {nodeid}")
    if config.option.vram_update_baseline:
        tr.write_line(f"vramscope: {len(state['measured'])} peaks stored in {config.option.vram_baseline}")
