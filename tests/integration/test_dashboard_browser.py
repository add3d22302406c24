"""The dashboard in a real browser: `vramscope dashboard traces` serves every page without an error.

Starts `python -m profiler.cli dashboard traces --port <free>` in its own process group,
waits on /_stcore/health, then opens each page of the app (the app's own PAGES list) in
headless chromium, driven over the DevTools protocol (tools/screenshots.py), and fails if
a page shows a Streamlit exception or renders no chart/table. Skipped without chromium,
except under CI (CI installs it: `apt-get install -y chromium`).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))

import screenshots as shots  # noqa: E402

TRACES = REPO / "traces"
PAGE_TIMEOUT_S = 90
SERVER_TIMEOUT_S = 90


def _chromium() -> str | None:
    if Path("/usr/bin/chromium").exists():
        return "/usr/bin/chromium"
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _require_browser() -> str:
    chromium = _chromium()
    if chromium is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing under CI, which installs it (apt-get install -y chromium)")
        pytest.skip("chromium is not installed (/usr/bin/chromium): apt-get install -y chromium")
    if importlib.util.find_spec("streamlit") is None:
        if os.environ.get("CI"):
            pytest.fail("streamlit is missing under CI: pip install -e '.[dashboard]'")
        pytest.skip("streamlit is not installed: pip install 'vramscope[dashboard]'")
    return chromium


PAGES = shots.app_pages() if shots.APP.is_file() else []


@pytest.fixture(scope="module")
def served():
    chromium = _require_browser()
    with (
        shots.dashboard(TRACES, timeout=SERVER_TIMEOUT_S) as base,
        shots.Browser(chromium=chromium, timeout=30) as browser,
    ):
        yield base, browser


@pytest.mark.slow
def test_app_defines_the_pages():
    assert shots.APP.is_file(), f"{shots.APP} is missing"
    titles = [t for _, t in PAGES]
    for expected in (
        "Runs",
        "Overview",
        "Layers",
        "Categories",
        "Fragmentation",
        "KV cache",
        "Compare",
        "Stacks",
        "Live",
    ):
        assert expected in titles, f"page {expected!r} missing from the app's PAGES: {titles}"
    for url_path, title in PAGES:
        if url_path:
            assert (REPO / "dashboard" / "pages" / f"{url_path}.py").is_file(), title


@pytest.mark.slow
def test_sidebar_links_every_page(served):
    base, browser = served
    state = browser.load(base + "/", timeout=PAGE_TIMEOUT_S)
    links = {
        link.rstrip("/").rsplit("/", 1)[-1] if link.rstrip("/") != base else ""
        for link in shots.nav_links(state["html"])
    }
    assert links == {p for p, _ in PAGES}, f"sidebar links {sorted(links)} vs the app's pages"


@pytest.mark.slow
@pytest.mark.parametrize("url_path,title", PAGES, ids=[t for _, t in PAGES])
def test_page_renders_without_error(served, url_path, title):
    base, browser = served
    state = browser.load(
        f"{base}/{url_path}", timeout=PAGE_TIMEOUT_S, extra_done=shots.NOTICE_ONLY_PAGES.get(url_path, ())
    )
    bad = shots.problems(state, url_path)
    assert not bad, f"{title} (/{url_path}): " + "; ".join(bad)


# -- the verb, without a browser ----------------------------------------------------------


def test_missing_directory_is_one_line_exit_2(capsys, tmp_path):
    from profiler.cli import main

    assert main(["dashboard", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no such directory" in err


def test_missing_streamlit_is_one_line_exit_2(capsys, monkeypatch, tmp_path):
    from profiler.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a, **k: None if name == "streamlit" else real(name, *a, **k)
    )
    assert main(["dashboard", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "streamlit" in err


def test_command_binds_localhost_headless(tmp_path):
    from profiler.cli import dashboard

    cmd, env = dashboard.streamlit_command(tmp_path, 8765, "127.0.0.1")
    assert cmd[:4] == [sys.executable, "-m", "streamlit", "run"]
    assert cmd[cmd.index("--server.address") + 1] == "127.0.0.1"
    assert cmd[cmd.index("--server.headless") + 1] == "true"
    assert env["VRAMSCOPE_TRACES"] == str(tmp_path)
    assert cmd[cmd.index("--client.toolbarMode") + 1] == "viewer"  # no Deploy button
