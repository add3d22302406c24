"""Screenshots of every dashboard page, served from a traces directory, into docs/screenshots/.

    python tools/screenshots.py [TRACES_DIR] [--out docs/screenshots] [--size 1400,1000]

Starts `vramscope dashboard TRACES_DIR` on a free port, drives headless chromium
over the DevTools protocol, waits on each page until Streamlit has finished
running it (no "running" status widget, a chart/table/exception present, and
the DOM unchanged for a moment), and saves <page>.png. Exits 1 if a page shows
a Streamlit exception or renders empty.

Why not plain `chromium --headless --screenshot` / `--dump-dom`: Streamlit
renders over a websocket after the page has loaded, and --virtual-time-budget
fast-forwards virtual time without waiting for the server, so those capture
the loading skeleton. The helpers here (also used by
tests/integration/test_dashboard_browser.py) need only chromium and the `websockets`
package, which streamlit itself depends on.
"""

from __future__ import annotations

import argparse
import ast
import base64
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
APP = REPO / "dashboard" / "app.py"
CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "chromium", "chromium-browser", "google-chrome")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
    "--mute-audio",
]

# data-testid markers: what a page with content shows, and what a failed one shows.
CONTENT_MARKERS = (
    "stPlotlyChart",
    "stDataFrame",
    "stTable",
    "stMetric",
    "stVegaLiteChart",
    "stArrowVegaLiteChart",
    "stDataFrameResizable",
    "stJson",
)
ERROR_MARKERS = ("stException",)
# Pages whose honest answer for the bundled traces is a notice, not a chart: Live shows
# "No run is capturing now" when every run has a final status.
NOTICE_ONLY_PAGES = {"live": ("stAlert", "stAlertContainer")}
ERROR_TEXTS = ("Traceback (most recent call last)",)


# -- the pages ------------------------------------------------------------------------


def app_pages(app: Path = APP) -> list[tuple[str, str]]:
    """(url path, title) of every page, read from the app's own PAGES list without running it.

    The app builds st.Page(pages/<file>, title=...) for each (file, title, icon), with
    runs.py as the default: Streamlit serves a file page at its stem (the default at "")."""
    tree = ast.parse(app.read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "PAGES" for t in node.targets):
            pages = ast.literal_eval(node.value)
            break
    else:
        raise RuntimeError(f"{app}: no PAGES list")
    default = _default_page(tree)
    return [("" if f == default else Path(f).stem, title) for f, title, *_ in pages]


def _default_page(tree: ast.AST) -> str | None:
    """The file compared against in `default=(f == "x.py")`, if the app says so."""
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "default":
            for sub in ast.walk(node.value):
                if isinstance(sub, ast.Compare) and sub.comparators and isinstance(sub.comparators[0], ast.Constant):
                    return sub.comparators[0].value
    return None


def page_slug(url_path: str, title: str) -> str:
    return url_path or title.lower().replace(" ", "_")


# -- the server -----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_dashboard(traces: Path | str, port: int, log=None) -> subprocess.Popen:
    """`python -m profiler.cli dashboard TRACES --port N` in its own process group."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p))
    return subprocess.Popen(
        [sys.executable, "-m", "profiler.cli", "dashboard", str(traces), "--port", str(port)],
        cwd=REPO,
        env=env,
        start_new_session=True,
        stdout=log or subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )


def wait_healthy(port: int, proc: subprocess.Popen | None = None, timeout: float = 60) -> None:
    url = f"http://127.0.0.1:{port}/_stcore/health"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the dashboard exited with {proc.returncode} before serving")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f} s")


def stop_group(proc: subprocess.Popen, timeout: float = 10) -> None:
    """SIGTERM the process group, then SIGKILL it if it lingers."""
    if proc.poll() is not None and proc.returncode is not None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # children that outlived the leader
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=timeout)


@contextlib.contextmanager
def dashboard(traces: Path | str, port: int | None = None, timeout: float = 60):
    """A served dashboard: yields its base URL; the process group is killed on exit."""
    port = port or free_port()
    log = tempfile.TemporaryFile()
    proc = start_dashboard(traces, port, log=log)
    try:
        try:
            wait_healthy(port, proc, timeout)
        except Exception as exc:
            log.seek(0)
            tail = log.read().decode(errors="replace")[-3000:]
            raise RuntimeError(f"{exc}\n--- dashboard output ---\n{tail}") from exc
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_group(proc)
        log.close()


# -- the browser ----------------------------------------------------------------------


def find_chromium() -> str | None:
    for c in CHROMIUM_CANDIDATES:
        path = shutil.which(c)
        if path:
            return path
    return None


def chromium_command(chromium: str, user_data_dir: str, port: int, size=(1400, 1000)) -> list[str]:
    return [
        chromium,
        *CHROMIUM_FLAGS,
        f"--user-data-dir={user_data_dir}",
        f"--window-size={size[0]},{size[1]}",
        f"--remote-debugging-port={port}",
        "--remote-allow-origins=*",
        "about:blank",
    ]


class Browser:
    """Headless chromium driven over the DevTools protocol (one tab)."""

    def __init__(self, chromium: str | None = None, size=(1400, 1000), timeout: float = 30):
        self.chromium = chromium or find_chromium()
        if self.chromium is None:
            raise FileNotFoundError("chromium is not installed")
        self.size = size
        self.timeout = timeout
        self._id = 0

    def __enter__(self):
        from websockets.sync.client import connect  # a dependency of streamlit

        self._tmp = tempfile.TemporaryDirectory(prefix="vramscope-chromium-")
        port = free_port()
        self.command = chromium_command(self.chromium, self._tmp.name, port, self.size)
        self.proc = subprocess.Popen(
            self.command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        try:
            ws_url = self._page_target(port)
            self._conn = connect(ws_url, max_size=None, open_timeout=self.timeout)
            self.ws = self._conn.__enter__()
            self.call("Page.enable")
            self.call("Runtime.enable")
            self.call(
                "Emulation.setDeviceMetricsOverride",
                width=self.size[0],
                height=self.size[1],
                deviceScaleFactor=1,
                mobile=False,
            )
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc):
        with contextlib.suppress(Exception):
            self._conn.__exit__(None, None, None)
        stop_group(self.proc, timeout=5)
        self._tmp.cleanup()

    def _page_target(self, port: int) -> str:
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"chromium exited with {self.proc.returncode}: {' '.join(self.command)}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=2) as r:
                    for t in json.load(r):
                        if t.get("type") == "page" and t.get("webSocketDebuggerUrl"):
                            return t["webSocketDebuggerUrl"]
            except OSError:
                pass
            time.sleep(0.2)
        raise TimeoutError("chromium's DevTools endpoint did not answer")

    def call(self, method: str, timeout: float | None = None, **params):
        self._id += 1
        my_id = self._id
        self.ws.send(json.dumps({"id": my_id, "method": method, "params": params}))
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no answer to {method}")
            msg = json.loads(self.ws.recv(timeout=left))
            if msg.get("id") == my_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result.get("result", {}).get("value")

    _STATE_JS = """(() => {
        const ids = {};
        for (const el of document.querySelectorAll('[data-testid]')) {
            const k = el.getAttribute('data-testid'); ids[k] = (ids[k] || 0) + 1; }
        return JSON.stringify({ids: ids, len: document.documentElement.outerHTML.length,
                               text: (document.body && document.body.innerText || '').length});
    })()"""

    def load(self, url: str, timeout: float = 60, settle: float = 1.5, extra_done: tuple = ()) -> dict:
        """Open url and wait until Streamlit has finished the page; returns its state:
        {"ids": {data-testid: count}, "html": outerHTML, "ready": bool, "seconds": float}.
        extra_done: more data-testid markers that count as a finished page."""
        self.call("Page.navigate", url=url)
        return self.wait_done(timeout, settle, extra_done)

    def wait_done(self, timeout: float = 60, settle: float = 1.5, extra_done: tuple = ()) -> dict:
        """Wait until Streamlit has finished its run (after a navigation or a widget change): no
        running status, a chart, table, exception or `extra_done` marker there, and the DOM unchanged
        for `settle` seconds. Returns the page's state, as load() does."""
        t0 = time.monotonic()
        deadline = t0 + timeout
        stable_since, last, state = None, None, {"ids": {}}
        while time.monotonic() < deadline:
            time.sleep(0.25)
            state = json.loads(self.evaluate(self._STATE_JS) or '{"ids": {}, "len": 0}')
            ids = state["ids"]
            running = (
                any(k.startswith("stStatusWidgetRunning") for k in ids)
                or "stSkeleton" in ids
                or "stAppSkeleton" in ids
                or "stSpinner" in ids
            )
            done = any(k in ids for k in CONTENT_MARKERS + ERROR_MARKERS + extra_done)
            key = (state["len"], tuple(sorted(ids.items())))
            if done and not running and key == last:
                stable_since = stable_since or time.monotonic()
                if time.monotonic() - stable_since >= settle:
                    break
            else:
                stable_since = None
            last = key
        else:
            state["ready"] = False
            state["html"] = self.evaluate("document.documentElement.outerHTML") or ""
            state["seconds"] = time.monotonic() - t0
            return state
        state["ready"] = True
        state["html"] = self.evaluate("document.documentElement.outerHTML") or ""
        state["seconds"] = time.monotonic() - t0
        return state

    def click_at(self, selector_js: str) -> bool:
        """A real mouse click (pressed and released) in the middle of the element the JavaScript
        expression names: widgets that listen for mouse events, not click(), see it as a user's."""
        box = self.evaluate(
            f"(() => {{ const el = {selector_js}; if (!el) return null; el.scrollIntoView({{block: 'center'}});"
            " const r = el.getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; })()"
        )
        if not box:
            return False
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", type=kind, x=box[0], y=box[1], button="left", clickCount=1)
        return True

    def type_text(self, text: str) -> None:
        self.call("Input.insertText", text=text)

    def texts(self, selector: str) -> list[str]:
        """innerText of every element the CSS selector matches."""
        return (
            self.evaluate(f"Array.from(document.querySelectorAll({json.dumps(selector)})).map(e => e.textContent)")
            or []
        )

    def screenshot(self, path: Path) -> None:
        data = self.call("Page.captureScreenshot", format="png")["data"]
        Path(path).write_bytes(base64.b64decode(data))


def problems(state: dict, url_path: str | None = None) -> list[str]:
    """Why a loaded page counts as failed: an exception shown, or nothing rendered."""
    out = []
    content = CONTENT_MARKERS + NOTICE_ONLY_PAGES.get(url_path, ())
    ids, html = state["ids"], state.get("html", "")
    for m in ERROR_MARKERS:
        if m in ids:
            out.append(f"{ids[m]} Streamlit exception(s) shown: {_exception_text(html)}")
    for t in ERROR_TEXTS:
        if t in html and not any(m in ids for m in ERROR_MARKERS):
            out.append(f"{t!r} in the page")
    if not state.get("ready"):
        out.append(f"did not finish rendering in {state.get('seconds', 0):.0f} s")
    if not any(m in ids for m in content):
        out.append("no chart, table or metric rendered")
    if len(html) < 20_000 and url_path not in NOTICE_ONLY_PAGES:
        out.append(f"DOM only {len(html):,} characters")
    return out


def _exception_text(html: str, limit: int = 300) -> str:
    import html as h
    import re

    i = html.find('data-testid="stException"')
    if i < 0:
        return ""
    i = html.find(">", i) + 1
    text = re.sub(r"<[^>]+>", " ", html[i : i + 20000])
    return " ".join(h.unescape(text).split())[:limit]


def nav_links(html: str) -> list[str]:
    """The hrefs of the sidebar's page links, as served."""
    import re

    links = []
    for m in re.finditer(r"<a[^>]*>", html):
        tag = m.group(0)
        if 'data-testid="stSidebarNavLink"' in tag or 'data-testid="stTopNavLink"' in tag:
            href = re.search(r'href="([^"]*)"', tag)
            if href:
                links.append(href.group(1))
    return links


# -- main -----------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("traces", nargs="?", default=str(REPO / "traces"))
    parser.add_argument("--out", default=str(REPO / "docs" / "screenshots"))
    parser.add_argument("--size", default="1400,1000", help="window WIDTH,HEIGHT")
    parser.add_argument("--timeout", type=float, default=90, help="seconds per page")
    args = parser.parse_args(argv)
    size = tuple(int(v) for v in args.size.split(","))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    failed = False
    with dashboard(args.traces) as base, Browser(size=size) as browser:
        for url_path, title in app_pages():
            state = browser.load(
                f"{base}/{url_path}", timeout=args.timeout, extra_done=NOTICE_ONLY_PAGES.get(url_path, ())
            )
            path = out / f"{page_slug(url_path, title)}.png"
            browser.screenshot(path)
            bad = problems(state, url_path)
            failed |= bool(bad)
            print(f"{title:<14} {state['seconds']:5.1f} s  {path}" + (f"  FAILED: {'; '.join(bad)}" if bad else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
