"""The registries: a toggle, a KV cache layout, a category or a CLI verb is one file plus one entry.

The derived lists must equal their registry, and an overlay copy of a package with one new
file and one new registry entry (and nothing else) must work end to end in a fresh process.
"""

from __future__ import annotations

import filecmp
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from profiler import cli, estimate
from profiler.trace import schema
from profiler.trace.finalize import classify
from workloads import infer, suites, train
from workloads.kv import CACHES, KINDS, KVSpec, make_cache
from workloads.toggles import KEYS, TOGGLES, TrainToggles, by_key
from workloads.toggles.base import STAGES

REPO = Path(__file__).resolve().parents[2]


# -- toggles ----------------------------------------------------------------------------


def test_toggle_registry_is_consistent():
    assert KEYS == tuple(t.key for t in TOGGLES)
    assert len(set(KEYS)) == len(KEYS) and len({t.attr for t in TOGGLES}) == len(TOGGLES)
    assert all(t.stage in STAGES for t in TOGGLES)
    assert [t.stage for t in TOGGLES].count("optimizer") == 1  # off means its default
    fields = [f.name for f in TrainToggles.__dataclass_fields__.values()]
    assert fields == ["device", "batch_size", *(t.attr for t in TOGGLES)]
    assert all(by_key(t.key) is t for t in TOGGLES)


def test_every_ablation_row_round_trips_through_its_toggles():
    for toggle in TOGGLES:
        assert toggle.ablation, f"{toggle.key} has no row in the seeds suite"
        for _, row in toggle.ablation:
            assert toggle.key in row
            for key, value in row.items():
                assert by_key(key).from_value(value).to_value() == value


def test_lists_derived_from_the_toggle_registry():
    assert suites.known_toggles("train") == KEYS
    dests = {a.dest for a in train._parser()._actions}
    assert set(KEYS) <= dests
    assert suites.cuda_only() == {t.key: t.cuda_only for t in TOGGLES if t.cuda_only}
    own = [row for t in TOGGLES for row in t.ablation]
    assert suites.SUITES["seeds"].rows() == [(suites.BASELINE, {}), *own, *suites.SEED_COMBINATIONS]


# -- KV caches --------------------------------------------------------------------------


def test_kv_registry_and_what_derives_from_it():
    assert KINDS == tuple(CACHES) and all(cls.kind == kind for kind, cls in CACHES.items())
    assert infer.KV_CHOICES == ("none", *KINDS)
    spec = KVSpec(layers=1, kv_heads=1, head_dim=4)
    for kind in KINDS:
        assert type(make_cache(kind, spec, 1, max_len=4, window=2)) is CACHES[kind]
    names = [name for name, _ in suites.SUITES["kv"].rows()]
    assert {f"kv-{kind}" for kind in KINDS if kind != suites.BASELINE_KV} <= set(names)
    assert names[0] == suites.BASELINE


def test_ablate_suite_choices_are_the_suites():
    import argparse

    from workloads import ablate_cli

    parser = argparse.ArgumentParser()
    ablate_cli.add_arguments(parser)
    suite = next(a for a in parser._actions if a.dest == "suite")
    assert tuple(suite.choices) == tuple(suites.SUITES)
    assert all(s.about in suite.help for s in suites.SUITES.values())


# -- categories ---------------------------------------------------------------------------


def test_every_category_is_classified_and_roles_map_to_categories():
    values = [c.value for c in schema.Category]
    assert classify.CATEGORY_VALUES == values
    assert schema.ROLES == tuple(schema.ROLE_CATEGORIES)
    assert all(isinstance(c, schema.Category) for c in schema.ROLE_CATEGORIES.values())
    assert classify.WEAK_HINTS <= set(values)


def test_the_estimate_speaks_the_trace_categories():
    values = {c.value for c in schema.Category}
    assert set(estimate.PREDICTED) <= values
    assert set(estimate._EXPLAIN) == {*estimate.PREDICTED, "other", "total"}
    est = estimate.estimate("tiny", batch=4, seq=32)
    assert list(est)[: len(estimate.BREAKDOWN)] == list(estimate.BREAKDOWN)
    from workloads.toggles.optimizer import NAMES
    from workloads.toggles.precision import DTYPES

    assert estimate.OPTIMIZERS == NAMES  # the model covers every optimizer the workload has
    assert tuple(estimate.PRECISION_BYTES) == ("fp32", *DTYPES)


# -- CLI verbs ------------------------------------------------------------------------------


def test_ablate_comes_from_the_entry_point_group():
    assert ("ablate", "workloads.ablate_cli") in cli._entry_point_verbs()
    assert ("ablate", "workloads.ablate_cli") in cli.plugin_verbs()


VERB = '''\
"""Say hello: a verb from another package."""

NAME = "hello"
HELP = __doc__.splitlines()[0]


def add_arguments(parser):
    parser.add_argument("--times", type=int, default=1)


def run(args):
    print("hello " * args.times)
    return 0
'''


@pytest.fixture
def fake_plugin(tmp_path, monkeypatch):
    """An installed distribution (a dist-info on sys.path) whose entry point adds `hello`, and
    one that tries to take `run`."""
    dist = tmp_path / "vramscope_fake_verbs-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: vramscope-fake-verbs\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        "[vramscope.verbs]\nhello = vramscope_fake_verb\nrun = vramscope_fake_verb\n"
    )
    (tmp_path / "vramscope_fake_verb.py").write_text(VERB)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    sys.modules.pop("vramscope_fake_verb", None)


def test_entry_point_verbs_are_listed_and_run(fake_plugin, capsys):
    assert ("hello", "vramscope_fake_verb") in cli.plugin_verbs()
    assert ("ablate", "workloads.ablate_cli") in cli.plugin_verbs()  # installed beside the fake one
    assert dict(cli.plugin_verbs()).get("run") is None  # a built-in verb keeps its name
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "hello" in out and "Say hello: a verb from another package." in out
    assert "tabulate memory and speed" in out  # ablate's help line
    assert "vramscope_fake_verb" not in sys.modules  # listing a verb does not import it
    assert cli.main(["hello", "--times", "2"]) == 0
    assert capsys.readouterr().out.strip() == "hello hello"


def test_a_built_in_verb_never_looks_at_other_packages(monkeypatch):
    def fail():
        raise AssertionError("entry points read for a built-in verb")

    monkeypatch.setattr(cli, "_entry_point_verbs", fail)
    assert cli._commands("run") == cli._COMMANDS


def test_help_imports_no_verb_nor_workloads():
    code = (
        "import sys; from profiler.cli import main; rc = main(['--help']);"
        "print([m for m in sys.modules if m.split('.')[0] in ('workloads', 'pandas')"
        " or m.startswith('profiler.cli.')]); sys.exit(rc)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "ablate" in proc.stdout and proc.stdout.strip().splitlines()[-1] == "[]"


# -- one file plus one entry, in an overlay copy ------------------------------------------


def _overlay(tmp_path: Path, package: str) -> Path:
    root = tmp_path / "overlay"
    shutil.copytree(REPO / package, root / package, ignore=shutil.ignore_patterns("__pycache__"))
    return root


def _add_line(path: Path, after: str, line: str) -> None:
    text = path.read_text()
    assert text.count(after) == 1, after
    path.write_text(text.replace(after, after + line))


def _changed(root: Path, package: str) -> list[str]:
    """Files of the overlay's package that are new or differ from the repository's."""
    out = []
    for path in sorted((root / package).rglob("*.py")):
        rel = path.relative_to(root)
        if not (REPO / rel).exists() or not filecmp.cmp(path, REPO / rel, shallow=False):
            out.append(str(rel))
    return out


def _run(root: Path, code: str) -> str:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), str(REPO)]))
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, cwd=root, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


DUMMY_TOGGLE = '''\
"""Dummy: a step toggle that records where it was applied."""

from __future__ import annotations

from dataclasses import dataclass

from workloads.toggles.base import Toggle, is_on
from workloads.toggles.plan import StepPlan

APPLIED: list[str] = []


@dataclass(kw_only=True, slots=True)
class DummyConfig(Toggle):
    key = "dummy"
    stage = "step"
    cli = {"action": "store_const", "const": "on"}
    ablation = (("dummy", {"dummy": "on"}),)

    @classmethod
    def from_value(cls, value) -> "DummyConfig":
        if is_on(value):
            return cls()
        raise ValueError(f"dummy: expected on or off, got {value!r}")

    def to_value(self) -> str:
        return "on"

    def apply(self, plan: StepPlan) -> None:
        APPLIED.append(plan.device.type)
'''


@pytest.mark.slow
def test_a_new_toggle_is_one_file_and_one_registry_entry(tmp_path):
    root = _overlay(tmp_path, "workloads")
    (root / "workloads/toggles/dummy.py").write_text(DUMMY_TOGGLE)
    registry = root / "workloads/toggles/__init__.py"
    _add_line(
        registry,
        "from workloads.toggles.compile import CompileConfig\n",
        "from workloads.toggles.dummy import DummyConfig\n",
    )
    _add_line(registry, "    AllocatorConfig,\n", "    DummyConfig,\n")
    assert _changed(root, "workloads") == ["workloads/toggles/__init__.py", "workloads/toggles/dummy.py"]
    out = _run(
        root,
        f"""
        from workloads import suites, train
        from workloads.toggles import dummy, from_dict

        toggles = from_dict({{"dummy": "on"}})
        assert toggles.dummy is not None and toggles.to_dict() == {{"dummy": "on"}}
        assert "--dummy" in train._parser().format_help()
        rows = {{c.name: c for c in suites.configurations("seeds", device="cpu")}}
        assert rows["dummy"].toggles == {{"dummy": "on"}} and rows["dummy"].skip is None
        result = train.run("tiny", {{"dummy": "on"}}, out={str(tmp_path / "runs")!r}, steps=1, device="cpu")
        assert result["status"] == "ok", result
        assert dummy.APPLIED == ["cpu"]
        print("ok")
    """,
    )
    assert out.strip() == "ok"


DUMMY_CACHE = '''\
"""Dummy: the torch.cat cache under a kind of its own."""

from workloads.kv.concat import ConcatCache


class DummyCache(ConcatCache):
    kind = "dummy"
'''


@pytest.mark.slow
def test_a_new_kv_cache_is_one_file_and_one_registry_entry(tmp_path):
    root = _overlay(tmp_path, "workloads")
    (root / "workloads/kv/dummy.py").write_text(DUMMY_CACHE)
    registry = root / "workloads/kv/__init__.py"
    _add_line(registry, "from workloads.kv.concat import ConcatCache\n", "from workloads.kv.dummy import DummyCache\n")
    _add_line(registry, "        Int8Cache,\n", "        DummyCache,\n")
    assert _changed(root, "workloads") == ["workloads/kv/__init__.py", "workloads/kv/dummy.py"]
    out = _run(
        root,
        f"""
        from workloads import infer, suites

        assert "dummy" in infer.KV_CHOICES
        rows = {{c.name: c for c in suites.configurations("kv", device="cpu")}}
        assert rows["kv-dummy"].toggles == {{"kv": "dummy"}} and rows["kv-dummy"].skip is None
        result = infer.run("tiny", {{"kv": "dummy"}}, out={str(tmp_path / "runs")!r}, name="d", steps=2,
                           device="cpu")
        assert result["status"] == "ok", result
        print("ok")
    """,
    )
    assert out.strip() == "ok"


@pytest.mark.slow
def test_a_new_category_is_one_enum_line(tmp_path):
    root = _overlay(tmp_path, "profiler")
    _add_line(
        root / "profiler/trace/schema.py",
        '    REDUCE_SCATTER = "reduce_scatter"  # reduce-scatter input buffers\n',
        '    LORA_ADAPTER = "lora_adapter"\n',
    )
    assert _changed(root, "profiler") == ["profiler/trace/schema.py"]
    out = _run(
        root,
        f"""
        import torch

        import profiler
        from profiler.analysis import category_at_peak
        from profiler.trace.reader import load_trace

        with profiler.profile(out={str(tmp_path / "runs")!r}, name="c", backend="cpu") as prof:
            with profiler.category("lora_adapter"):
                kept = torch.ones(1024)
            prof.step()
        at_peak = category_at_peak(load_trace(prof.run_dir))
        print(int(at_peak.set_index("category").loc["lora_adapter", "total_bytes"]))
    """,
    )
    assert int(out.strip().splitlines()[-1]) >= 4096
