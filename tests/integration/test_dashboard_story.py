"""The dashboard as a user reads it, in headless chromium: every page leads with its headline,
Overview's peak is `vramscope report`'s, picks are never dropped, a corrupt run is one line.

One folder served once: a CPU-captured run of the tiny GPT written here (it sorts first, so the
single-run pages open on it), four of the bundled seed runs with their ablation table, and the
bundled KV runs, one of which has its events.parquet overwritten after its summary.json was cached
(the summary survives; the trace does not).
"""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

import pytest
from test_dashboard_browser import PAGE_TIMEOUT_S, SERVER_TIMEOUT_S, _require_browser

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))

import screenshots as shots  # noqa: E402

TRACES = REPO / "traces"
SEEDS = ("baseline", "bf16", "ckpt-full", "bf16-ckpt")
CORRUPT = "ablate-kv-kv-paged"
# Pages with an answer for these runs (Live has none: no run is capturing).
HEADLINE_PAGES = [(p, t) for p, t in shots.app_pages() if p != "live"] if shots.APP.is_file() else []


def _cpu_run(out: Path) -> Path:
    """Three training steps of the tiny GPT, captured on the CPU backend."""
    import torch

    import profiler
    from workloads.model import preset
    from workloads.train import build, make_batch, train_step

    torch.manual_seed(0)
    cfg = preset("tiny")
    model, opt = build(cfg)
    with profiler.profile(out=out, name="tiny-cpu", backend="cpu") as prof:
        for _ in range(3):
            train_step(model, opt, make_batch(cfg))
    return Path(prof.run_dir)


def _folder(root: Path) -> dict:
    from profiler.trace.summary_cache import load_summary

    cpu = _cpu_run(root / "0-cpu")
    seeds = root / "h100-ablation-seeds"
    seeds.mkdir()
    for name in SEEDS:
        run = next((TRACES / "h100-ablation-seeds").glob(f"ablate-seeds-{name}-2*"))
        shutil.copytree(run, seeds / run.name)
    for table in (TRACES / "h100-ablation-seeds").glob("*.parquet"):
        shutil.copy(table, seeds / table.name)
    shutil.copytree(TRACES / "h100-ablation-kv", root / "h100-ablation-kv")
    bad = next((root / "h100-ablation-kv").glob(f"{CORRUPT}-2*"))
    load_summary(bad)  # summary.json is cached ...
    (bad / "events.parquet").write_bytes(b"PAR1 overwritten")  # ... then the trace breaks
    return {"cpu": cpu, "bad": bad}


@pytest.fixture(scope="module")
def story(tmp_path_factory):
    chromium = _require_browser()
    root = tmp_path_factory.mktemp("story")
    runs = _folder(root)
    with (
        shots.dashboard(root, timeout=SERVER_TIMEOUT_S) as base,
        shots.Browser(chromium=chromium, timeout=30) as browser,
    ):
        yield base, browser, runs


# A page whose answer for a run is a notice (Fragmentation of a CPU run) is finished when it shows it.
NOTICES = ("stAlert", "stAlertContainer")


def _open(browser, base: str, url_path: str) -> dict:
    state = browser.load(f"{base}/{url_path}", timeout=PAGE_TIMEOUT_S, extra_done=NOTICES)
    bad = [
        p for p in shots.problems(state, url_path) if "no chart" not in p or not any(n in state["ids"] for n in NOTICES)
    ]
    assert not bad, f"/{url_path}: " + "; ".join(bad)
    return state


def _headline(browser) -> str:
    found = browser.texts(".st-key-headline")
    assert found and found[0].strip(), "no headline"
    return found[0].strip()


def _axis_titles(browser) -> list[str]:
    return [t.strip() for t in browser.texts(".xtitle, .ytitle, .y2title") if t.strip()]


@pytest.mark.slow
@pytest.mark.parametrize("url_path,title", HEADLINE_PAGES, ids=[t for _, t in HEADLINE_PAGES])
def test_every_page_leads_with_a_headline_and_says_the_corrupt_run_once(story, url_path, title):
    base, browser, runs = story
    _open(browser, base, url_path)
    assert len(_headline(browser)) > 20, title
    assert "event index" not in [t.lower() for t in _axis_titles(browser)]
    if url_path != "ranks":  # Ranks lists multi-rank runs only
        lines = [t for t in browser.texts('[data-testid="stAlertContentWarning"]') if CORRUPT in t]
        assert len(lines) == 1 and "\n" not in lines[0].strip(), lines


@pytest.mark.slow
def test_overview_of_a_cpu_captured_run_says_the_reports_peak(story):
    """The single-run pages open on the tiny GPT: Overview's headline has the report's peak; its
    bars name the user's modules; its axes are in MiB, the timeline in seconds."""
    from profiler.report import build_report
    from profiler.trace.reader import load_trace
    from profiler.units import human_bytes

    base, browser, runs = story
    _open(browser, base, "overview")
    report = build_report(load_trace(runs["cpu"]))
    assert _headline(browser).startswith(f"Peak {human_bytes(report['peak']['allocated_bytes'])} allocated")
    titles = _axis_titles(browser)
    assert "MiB" in titles and "seconds since capture began" in titles, titles
    ticks = browser.texts(".ytick text")
    assert "GPT" in ticks and any(t.startswith("blocks.") for t in ticks), ticks
    _open(browser, base, "layers")
    assert "GPT.forward itself" in browser.texts(".ytick text")


@pytest.mark.slow
def test_stack_labels_read_file_line_function(story):
    base, browser, _ = story
    _open(browser, base, "stacks")
    ticks = [t for t in browser.texts(".ytick text") if t.strip()]
    assert ticks and all(re.match(r"^(\(no stack\)|[\w.<>-]+\.py:\d+ \w+)", t) for t in ticks), ticks
    assert any(t.startswith(("model.py:", "train.py:")) for t in ticks), ticks


def _tags(browser) -> list[str]:
    """The picks shown in the page's first multiselect."""
    return (
        browser.evaluate(
            "Array.from(document.querySelector('[data-testid=\"stMultiSelect\"]')"
            ".querySelectorAll('[data-tag] > span[title]')).map(e => e.title)"
        )
        or []
    )


def _pick(browser, label: str) -> None:
    """Type into the Compare page's run picker and click the option whose text is `label`."""
    picker = "document.querySelector('[data-testid=\"stMultiSelect\"] input')"
    assert browser.click_at(picker)
    browser.type_text(label.split("  ·  ")[0])
    option = f"Array.from(document.querySelectorAll('[role=\"option\"]')).find(e => e.textContent.trim() === {label!r})"
    for _ in range(20):
        if browser.click_at(option):
            break
        browser.wait_done(timeout=2, settle=0.2)
    else:
        raise AssertionError(f"no option {label!r}")
    browser.wait_done(timeout=PAGE_TIMEOUT_S)


@pytest.mark.slow
def test_four_runs_added_one_at_a_time_on_compare_are_all_selected(story):
    from dashboard.data import runs_table

    base, browser, runs = story
    table = runs_table(runs["cpu"].parents[1])
    dirs = table["run"].map(lambda p: Path(p).name)
    labels = [table.loc[dirs.str.startswith(f"ablate-seeds-{n}-2"), "label"].iloc[0] for n in SEEDS]
    _open(browser, base, "compare")
    before = _tags(browser)
    for label in labels:
        _pick(browser, label)
    tags = _tags(browser)
    assert len(tags) == len(before) + 4 and all(any(label in t for t in tags) for label in labels), tags
    # The page opened on two KV (inference) runs of one folder; with training runs added, it says so
    # instead of naming a best option.
    assert _headline(browser).startswith("These runs differ in kind") and "Best option" not in _headline(browser)


@pytest.mark.slow
def test_kv_page_with_a_corrupt_run_shows_one_line_and_the_healthy_runs(story):
    base, browser, runs = story
    _open(browser, base, "kv")
    lines = [t for t in browser.texts('[data-testid="stAlertContentWarning"]') if CORRUPT in t]
    assert len(lines) == 1
    assert "Traceback" not in browser.evaluate("document.body.innerText")
    tags = " ".join(_tags(browser))
    assert "ablate-kv-baseline" in tags and "ablate-kv-kv-int8" in tags and CORRUPT not in tags
    assert _headline(browser).startswith("Bytes per token position")
