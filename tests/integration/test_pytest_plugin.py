"""The pytest plugin (profiler/pytest_plugin.py), run through pytester on the CPU backend."""

from __future__ import annotations

import json
import multiprocessing
import subprocess
import sys
from pathlib import Path

import pytest
import torch  # noqa: F401  (imported here, so that in-process runs never re-import it)

from profiler.pytest_plugin import parse_size, read_baseline, update_baseline

pytest_plugins = ["pytester"]

REPO = Path(__file__).resolve().parents[2]
PLUGIN = ("-p", "profiler.pytest_plugin")

MODEL = """
import pytest
import torch
from torch import nn


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(64, 64)

    def forward(self, x):
        return self.proj(x).relu()


def make_big(n):
    return torch.ones(n, 1024)  # n * 4 KiB


def run(rows=8):
    model = Tiny()
    return model(torch.randn(rows, 64))
"""

BUDGETS = (
    MODEL
    + """

@pytest.mark.vram_limit("64 MiB")
def test_small():
    run()


@pytest.mark.vram_limit(1 << 20)
def test_too_big():
    out = run(rows=256)
    big = make_big(1024)
    assert big.sum() > 0 and out.numel() > 0


def test_unmarked():
    run()
"""
)


@pytest.fixture(scope="module")
def _warm(tmp_path_factory):
    """One capture and one report in this process first: in-process runs drop the modules they
    import, and torch cannot import its lazily loaded parts twice."""
    from profiler.capture.session import profile
    from profiler.pytest_plugin import peak_report

    ns: dict = {}
    exec(MODEL, ns)
    with profile(out=str(tmp_path_factory.mktemp("warm")), name="warm") as prof:
        ns["run"]()
    peak_report(prof.run_dir)


@pytest.fixture
def pt(pytester, monkeypatch, _warm):
    # The inner runs must import this checkout's profiler (an editable install may point
    # elsewhere), and load the plugin only through -p (an installed entry point would clash).
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
    return pytester


@pytest.mark.parametrize(
    "text, expected",
    [
        ("2 GiB", 2 << 30),
        ("512 MiB", 512 << 20),
        ("1.5GB", 1_500_000_000),
        (4096, 4096),
        ("100", 100),
        ("3 kB", 3000),
        ("1K", 1024),
        ("0.5 gib", 1 << 29),
        ("7 B", 7),
    ],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["", "lots", "2 GiBs", "-1 MiB", -5, None, True, float("nan")])
def test_parse_size_rejects(bad):
    with pytest.raises(ValueError):
        parse_size(bad)


def test_budget_pass_and_readable_failure(pt):
    pt.makepyfile(test_budget=BUDGETS)
    traces = pt.path / "traces"
    result = pt.runpytest(*PLUGIN, "--vram-traces", str(traces), "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2, failed=1)
    out = result.stdout.str()
    # The verdict: peak and budget, human and exact.
    result.stdout.re_match_lines(
        [
            r".*test_budget.py::test_too_big: peak \d+\.\d\d MiB \([\d,]+ B\) exceeds the budget "
            r"1\.00 MiB \(1,048,576 B\) by .*"
        ]
    )
    # The top modules and stacks at the peak: the model's module, the helper that allocated.
    assert "top modules at the peak:" in out
    assert "Tiny" in out
    assert "top stacks at the peak" in out
    assert "4.00 MiB (4,194,304 B) in 1 block" in out
    result.stdout.re_match_lines([r"\s+test_budget.py:\d+ make_big", r"\s+test_budget.py:\d+ test_too_big"])
    # The trace path, which loads.
    line = next(s for s in out.splitlines() if s.startswith("trace: "))
    run_dir = Path(line.split()[1])
    assert run_dir.parent == traces and (run_dir / "meta.json").exists()
    meta = json.loads((run_dir / "meta.json").read_text())
    peak = meta["max_allocated_bytes"]
    assert peak > 4 << 20 and f"({peak:,} B)" in out
    # Only the marked tests were profiled.
    assert len(list(traces.iterdir())) == 2
    assert "test_unmarked" not in "".join(p.name for p in traces.iterdir())


def test_bad_marker_fails_readably(pt):
    pt.makepyfile(
        test_bad="""
import pytest

@pytest.mark.vram_limit("lots")
def test_x():
    pass
"""
    )
    result = pt.runpytest(*PLUGIN)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*vram_limit: not a size: 'lots'*"])


def test_options_need_a_baseline(pt):
    pt.makepyfile(test_x="def test_x(): pass")
    result = pt.runpytest(*PLUGIN, "--vram-update-baseline")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*need --vram-baseline FILE*"])


def test_regression_against_a_baseline(pt):
    grows = (
        MODEL
        + """

ROWS = {rows}


def test_grows():
    big = make_big(ROWS)
    assert big.sum() > 0


def test_steady():
    run()
"""
    )
    pt.makepyfile(test_reg=grows.format(rows=256))
    baseline = pt.path / "vram.json"
    first = pt.runpytest(*PLUGIN, "--vram-baseline", str(baseline), "--vram-update-baseline")
    first.assert_outcomes(passed=2)
    stored = read_baseline(baseline)["tests"]
    assert set(stored) == {"test_reg.py::test_grows", "test_reg.py::test_steady"}
    before = stored["test_reg.py::test_grows"]["cpu"]
    assert before >= 256 * 4096

    # The same code again: within the allowance.
    same = pt.runpytest(*PLUGIN, "--vram-baseline", str(baseline), "--vram-regression", "10")
    same.assert_outcomes(passed=2)

    # Twice the memory: fails, naming both numbers; the other test still passes.
    pt.makepyfile(test_reg=grows.format(rows=512))
    second = pt.runpytest(*PLUGIN, "--vram-baseline", str(baseline), "--vram-regression", "10")
    second.assert_outcomes(passed=1, failed=1)
    out = second.stdout.str()
    assert "test_reg.py::test_grows: peak" in out and "over the baseline's" in out
    assert f"({before:,} B)" in out and "allowed: +10%" in out
    assert read_baseline(baseline)["tests"]["test_reg.py::test_grows"]["cpu"] == before  # not updated

    # A generous allowance passes; updating stores the new peak.
    pt.runpytest(*PLUGIN, "--vram-baseline", str(baseline), "--vram-regression", "500").assert_outcomes(passed=2)
    pt.runpytest(*PLUGIN, "--vram-baseline", str(baseline), "--vram-update-baseline").assert_outcomes(passed=2)
    assert read_baseline(baseline)["tests"]["test_reg.py::test_grows"]["cpu"] > 1.5 * before


@pytest.mark.slow  # worker processes import torch (and torch._dynamo, at the first capture)
def test_xdist_budgets_and_baseline(pt):
    pytest.importorskip("xdist")
    more = (
        MODEL
        + "\n\n"
        + "\n\n".join(
            f"""
@pytest.mark.vram_limit("64 MiB")
def test_fits_{i}():
    run()
"""
            for i in range(4)
        )
    )
    pt.makepyfile(test_budget=BUDGETS, test_more=more)
    baseline = pt.path / "out" / "vram.json"
    result = pt.runpytest_subprocess(
        *PLUGIN,
        "-p",
        "xdist.plugin",
        "-n",
        "2",
        "--vram-baseline",
        str(baseline),
        "--vram-update-baseline",
        timeout=120,
    )
    result.assert_outcomes(passed=6, failed=1)
    result.stdout.fnmatch_lines(
        ["*test_too_big: peak * exceeds the budget 1.00 MiB (1,048,576 B)*", "*test_budget.py:* make_big*"]
    )
    # Both workers' peaks reached the controller, which wrote them all.
    stored = read_baseline(baseline)["tests"]
    assert len(stored) == 7 and all(v["cpu"] > 0 for v in stored.values())
    assert not list(baseline.parent.glob("*.tmp"))


def _writer(path, worker):
    for i in range(15):
        update_baseline(path, {f"t.py::test_{worker}_{i}": {"cpu": worker * 1000 + i}})


def test_concurrent_baseline_writes_lose_nothing(tmp_path):
    path = tmp_path / "vram.json"
    update_baseline(path, {"t.py::old": {"cuda": 7}})
    ctx = multiprocessing.get_context("fork" if sys.platform != "win32" else "spawn")
    procs = [ctx.Process(target=_writer, args=(path, w)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    tests = read_baseline(path)["tests"]
    assert len(tests) == 61 and tests["t.py::old"] == {"cuda": 7}
    assert tests["t.py::test_3_14"] == {"cpu": 3014}
    # Backends are kept side by side.
    update_baseline(path, {"t.py::old": {"cpu": 5}})
    assert read_baseline(path)["tests"]["t.py::old"] == {"cuda": 7, "cpu": 5}


def test_plugin_import_is_cheap():
    code = (
        "import sys, profiler.pytest_plugin; "
        "bad = [m for m in ('torch', 'pandas', 'profiler.analysis') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
