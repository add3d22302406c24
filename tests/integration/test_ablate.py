"""`vramscope ablate`: the configuration matrix, baseline diffs, failed rows, the table and the CLI.

Unit tests replace workloads.ablate.launch (the one function that starts a process) with
a fake child that writes the result a configuration asks for, so that OOMs, errors,
crashes and timeouts cost nothing. The integration test at the end runs both suites for
real on the CPU, once workloads.train.run and workloads.infer.run exist.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
import types
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
from fakes import write_trace

from profiler.cli import main
from workloads import ablate, run_one
from workloads.ablate_cli import render

REPO = Path(__file__).resolve().parents[2]


# -- the matrix -----------------------------------------------------------------------


def test_seeds_start_with_the_baseline_and_skip_cuda_rows_on_cpu():
    configs = ablate.configurations("seeds", device="cpu")
    assert configs[0].name == "baseline" and configs[0].toggles == {} and configs[0].skip is None
    assert len({c.name for c in configs}) == len(configs)
    assert all(c.kind == "train" for c in configs)
    skipped = {c.name: c.skip for c in configs if c.skip}
    assert set(skipped) == {"adamw-fused", "attn-efficient", "compile", "expandable", "bf16+ckpt+fused"}
    # The reasons are the toggles' own checks, and the runner's for what only it refuses.
    assert skipped["attn-efficient"] == "attention efficient does not run on cpu; there use math or flash"
    assert skipped["bf16+ckpt+fused"] == "optimizer adamw_fused needs a cuda device, got cpu"
    assert skipped["compile"].startswith("compile=on needs CUDA (")


def test_kv_suite_is_inference_with_a_concat_baseline():
    configs = ablate.configurations("kv", device="cpu")
    assert [c.kind for c in configs] == ["infer"] * len(configs)
    assert configs[0].toggles == {"kv": "concat"}
    assert {c.toggles["kv"] for c in configs} == {"none", "concat", "prealloc", "sliding", "paged", "int8"}
    assert len({c.name for c in configs}) == len(configs)
    assert {"kv": "prealloc", "weights": "int8"} in [c.toggles for c in configs]
    assert not [c for c in configs if c.skip]


def test_vary_is_a_cartesian_product_on_top_of_fixed_toggles():
    configs = ablate.configurations(
        "seeds",
        vary={"precision": ["fp32", "bf16"], "checkpointing": [None, "full", "every:2"]},
        fixed={"accumulation": 4},
    )
    assert len(configs) == 6
    assert configs[0].toggles == {"accumulation": 4, "precision": "fp32"}  # None: the toggle unset
    assert configs[0].name == "precision=fp32,checkpointing=off"
    assert configs[-1].toggles == {"accumulation": 4, "precision": "bf16", "checkpointing": "every:2"}
    assert [c.toggles.get("checkpointing") for c in configs[:3]] == [None, "full", "every:2"]


def test_fixed_toggles_move_the_baseline_but_not_a_rows_own_toggle():
    configs = {c.name: c for c in ablate.configurations("seeds", fixed={"precision": "bf16"}, device="cpu")}
    assert configs["baseline"].toggles == {"precision": "bf16"}
    assert configs["fp16"].toggles == {"precision": "fp16"}
    assert configs["sgd"].toggles == {"precision": "bf16", "optimizer": "sgd"}
    assert configs["attn-efficient"].skip
    # Fixed toggles are checked against the device too, and so are combinations.
    assert ablate.configurations("seeds", fixed={"compile": "on"}, device="cpu")[0].skip
    odd = ablate.configurations("seeds", vary={"accumulation": [3]}, device="cpu")[0]
    assert odd.skip == "accumulation 3 does not divide the batch of 4 sequences into equal micro-batches"


def test_coerce_and_unknown_names():
    assert ablate.coerce("4") == 4 and ablate.coerce("every:2") == "every:2"
    assert ablate.coerce("off") is None and ablate.coerce("None") is None
    with pytest.raises(ValueError, match="unknown suite"):
        ablate.configurations("nope")
    with pytest.raises(ValueError, match="unknown train toggle.s. precison; known: precision,"):
        ablate.configurations("seeds", fixed={"precison": "bf16"})
    with pytest.raises(ValueError, match="unknown infer toggle.s. precision; known: kv, weights"):
        ablate.configurations("kv", vary={"precision": ["bf16"]})


def test_child_env_sets_alloc_conf_from_the_toggle_only(monkeypatch):
    base = {"PYTORCH_CUDA_ALLOC_CONF": "garbage_collection_threshold:0.6", "PYTHONPATH": "/x"}
    assert "PYTORCH_CUDA_ALLOC_CONF" not in ablate.child_env({}, base)
    env = ablate.child_env({"alloc_conf": "expandable_segments:True"}, base)
    assert env["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    assert env["PYTHONPATH"].split(":") == [str(REPO), "/x"]


# -- baseline diffs -------------------------------------------------------------------

BASE = dict(status="ok", peak_allocated_bytes=1000, median_step_ms=100.0, tokens_per_s=None, loss=2.5)


def test_memory_saved_and_speed_change_from_step_times():
    d = ablate.baseline_diffs(
        dict(status="ok", peak_allocated_bytes=750, median_step_ms=80.0, tokens_per_s=None, loss=2.75), BASE
    )
    assert d["memory_saved_pct"] == pytest.approx(25.0)  # (1000 - 750) / 1000
    assert d["speed_change_pct"] == pytest.approx(25.0)  # 100 / 80 - 1: positive = faster
    assert d["loss_delta"] == pytest.approx(0.25)
    d = ablate.baseline_diffs(dict(status="ok", peak_allocated_bytes=1500, median_step_ms=200.0, loss=None), BASE)
    assert d["memory_saved_pct"] == pytest.approx(-50.0)  # more memory: negative
    assert d["speed_change_pct"] == pytest.approx(-50.0)  # twice the time: half the speed
    assert d["loss_delta"] is None


def test_speed_change_prefers_tokens_per_second():
    # Four times the tokens per step in twice the time is twice as fast, not half.
    base = {**BASE, "tokens_per_s": 1000.0}
    row = dict(status="ok", peak_allocated_bytes=1000, median_step_ms=200.0, tokens_per_s=2000.0)
    assert ablate.baseline_diffs(row, base)["speed_change_pct"] == pytest.approx(100.0)
    assert ablate.baseline_diffs(row, base)["memory_saved_pct"] == 0.0


def test_no_diffs_against_a_failed_baseline_or_for_a_failed_row():
    empty = {"memory_saved_pct": None, "speed_change_pct": None, "loss_delta": None}
    assert ablate.baseline_diffs(BASE, {**BASE, "status": "oom"}) == empty
    assert ablate.baseline_diffs({**BASE, "status": "error"}, BASE) == empty
    assert ablate.baseline_diffs(BASE, None) == empty


# -- rows from fake children ----------------------------------------------------------


@pytest.fixture
def fake_run(tmp_path) -> Path:
    """A real trace directory for the fake children's ok results to point at."""
    events = [
        ("alloc", 0x100, 4096, "forward", "blocks.0", "parameter"),
        ("alloc", 0x200, 1024, "forward", "blocks.0", "activation"),
        ("alloc", 0x300, 2048, "optimizer", None, "optimizer_state"),
    ]
    return write_trace(tmp_path / "fake-traces", events)


def _arg(argv, flag):
    return argv[argv.index(flag) + 1]


@pytest.fixture
def fake_children(monkeypatch, fake_run):
    """Replace the launcher: each configuration's outcome comes from its toggles."""
    calls = []

    def launch(argv, env, timeout):
        toggles = json.loads(_arg(argv, "--toggles"))
        calls.append({"toggles": toggles, "env": env, "argv": argv})
        result = {
            "status": "ok",
            "run_dir": str(fake_run),
            "peak_allocated_bytes": 10_000,
            "peak_reserved_bytes": None,
            "median_step_ms": 100.0,
            "tokens_per_s": 1280.0,
            "loss": 5.0,
            "losses": [5.5, 5.0],
            "error": None,
        }
        if toggles.get("precision") == "bf16" and len(toggles) == 1:
            result = {
                "status": "oom",
                "error": "OutOfMemoryError: CUDA out of memory. Tried to allocate 2 GiB",
                "peak_allocated_bytes": 99_999,
            }
        elif toggles.get("precision") == "fp16":
            result = {"status": "error", "error": "RuntimeError: fp16 exploded"}
        elif toggles.get("checkpointing") == "full" and len(toggles) == 1:
            return -9, "Traceback ...\nKilled\n"  # died without writing a result
        elif toggles.get("accumulation") == 4 and len(toggles) == 1:
            return None, ""  # timed out
        elif toggles.get("optimizer") == "sgd":
            result.update(peak_allocated_bytes=7_500, median_step_ms=80.0, tokens_per_s=1600.0, loss=5.25)
        Path(_arg(argv, "--result")).write_text(json.dumps(result))
        return 0, ""

    monkeypatch.setattr(ablate, "launch", launch)
    return calls


def test_failed_runs_are_rows_and_the_suite_goes_on(fake_children, tmp_path):
    result = ablate.run_suite("seeds", preset="tiny", steps=2, device="cpu", out=tmp_path / "out")
    t = result.table.set_index("name")
    assert list(t.index) == [c.name for c in ablate.configurations("seeds", device="cpu")]
    assert len(fake_children) == 13  # 18 rows, 5 skipped without a process
    assert t.loc["bf16", "status"] == "oom" and "out of memory" in t.loc["bf16", "note"]
    assert pd.isna(t.loc["bf16", "memory_saved_pct"]) and pd.isna(t.loc["bf16", "median_step_ms"])
    assert t.loc["fp16", "status"] == "error" and t.loc["fp16", "note"] == "RuntimeError: fp16 exploded"
    assert t.loc["ckpt-full", "status"] == "error"
    assert t.loc["ckpt-full", "note"] == "the run exited with code -9 and no result: Killed"
    assert t.loc["accum4", "status"] == "timeout" and "600 s" in t.loc["accum4", "note"]
    assert t.loc["compile", "status"] == "skipped" and t.loc["compile", "note"].startswith("compile=on needs CUDA")
    sgd = t.loc["sgd"]
    assert sgd["memory_saved_pct"] == pytest.approx(25.0) and sgd["speed_change_pct"] == pytest.approx(25.0)
    assert sgd["loss_delta"] == pytest.approx(0.25)
    base = t.loc["baseline"]
    assert base["status"] == "ok" and base["memory_saved_pct"] == 0.0 and base["config.precision"] is pd.NA
    # Trace facts come from the run's summary: categories at the peak, no fragmentation on the CPU.
    assert base["at_peak.optimizer_state"] == 2048 and base["at_peak.parameter"] == 4096
    assert pd.isna(base["fragmentation_ratio_at_peak"])
    # Every child is told its own toggles and gets the allocator setting only when it has one.
    expandable = [c for c in fake_children if "alloc_conf" in c["toggles"]]
    assert not expandable  # skipped on the CPU
    assert all("PYTORCH_CUDA_ALLOC_CONF" not in c["env"] for c in fake_children)
    assert all(_arg(c["argv"], "--device") == "cpu" for c in fake_children)


def test_runs_at_a_time_keep_the_suite_order(fake_children, tmp_path):
    one = ablate.run_suite("seeds", device="cpu", out=tmp_path / "a")
    three = ablate.run_suite("seeds", device="cpu", out=tmp_path / "b", jobs=3)
    assert three.meta["jobs"] == 3
    same = ["name", "status", "peak_allocated_bytes", "memory_saved_pct", "note"]
    pd.testing.assert_frame_equal(one.table[same], three.table[same])


def test_the_table_is_written_as_parquet(fake_children, tmp_path):
    result = ablate.run_suite("kv", steps=3, device="cpu", out=tmp_path / "out")
    assert result.path.parent == tmp_path / "out"
    assert result.path.name.startswith("ablation-kv-") and result.path.suffix == ".parquet"
    assert not [p for p in result.path.parent.iterdir() if p.name.startswith(".")]  # no temporaries left
    back = pd.read_parquet(result.path)
    assert list(back.columns) == list(result.table.columns)
    assert list(back["name"]) == [c.name for c in ablate.configurations("kv")]
    assert str(back["peak_allocated_bytes"].dtype) == "Int64"
    assert back["peak_allocated_bytes"].tolist() == [10_000] * len(back)
    meta = json.loads(pq.read_schema(result.path).metadata[b"vramscope.ablation"])
    assert meta["suite"] == "kv" and meta["steps"] == 3 and meta["device"] == "cpu"


def _values(column) -> list:
    return [None if pd.isna(v) else v for v in column]


def test_a_mixed_toggle_column_still_fits_parquet(tmp_path):
    rows = [
        ablate.result_row(ablate.Config(name=n, kind="train", toggles=t), {"status": "ok"})
        for n, t in (("a", {"checkpointing": 4}), ("b", {"checkpointing": "every:2"}), ("c", {"accumulation": 4}))
    ]
    table = ablate.build_table(rows)
    ablate.write_table(table, tmp_path / "t.parquet")
    back = pd.read_parquet(tmp_path / "t.parquet")
    assert _values(back["config.checkpointing"]) == ["4", "every:2", None]
    assert _values(back["config.accumulation"]) == [None, None, "4"]  # not "4.0" beside the gaps


def test_the_launcher_stops_a_run_that_takes_too_long():
    code, _ = ablate.launch([sys.executable, "-c", "import time; time.sleep(60)"], {}, timeout=0.5)
    assert code is None
    code, tail = ablate.launch([sys.executable, "-c", "print('hello'); raise SystemExit(3)"], {}, timeout=30)
    assert code == 3 and tail.strip() == "hello"


# -- run_one --------------------------------------------------------------------------


def _run_one(monkeypatch, tmp_path, body):
    fake = types.ModuleType("fake_workload")
    fake.run = body
    monkeypatch.setitem(sys.modules, "fake_workload", fake)
    monkeypatch.setitem(run_one.KINDS, "train", "fake_workload")
    out = tmp_path / "result.json"
    assert (
        run_one.main(
            [
                "--kind",
                "train",
                "--preset",
                "tiny",
                "--toggles",
                '{"precision": "bf16"}',
                "--out",
                str(tmp_path),
                "--name",
                "x",
                "--steps",
                "2",
                "--result",
                str(out),
            ]
        )
        == 0
    )
    return json.loads(out.read_text())


def test_run_one_writes_what_the_workload_returns(monkeypatch, tmp_path):
    def body(preset, toggles, *, out, name, steps, device):
        return {"status": "ok", "toggles": toggles, "steps": steps, "device": device, "preset": preset}

    assert _run_one(monkeypatch, tmp_path, body) == {
        "status": "ok",
        "toggles": {"precision": "bf16"},
        "steps": 2,
        "device": "auto",
        "preset": "tiny",
    }


@pytest.mark.parametrize(
    "exc, status", [(RuntimeError("CUDA out of memory.\nTried"), "oom"), (ValueError("bad toggle\n  value"), "error")]
)
def test_run_one_turns_an_exception_into_a_result(monkeypatch, tmp_path, exc, status):
    def body(*a, **k):
        raise exc

    result = _run_one(monkeypatch, tmp_path, body)
    assert result["status"] == status
    assert "\n" not in result["error"] and result["error"].startswith(type(exc).__name__ + ": ")


def test_run_one_rejects_a_result_that_breaks_the_contract(monkeypatch, tmp_path):
    assert _run_one(monkeypatch, tmp_path, lambda *a, **k: None)["status"] == "error"
    result = _run_one(monkeypatch, tmp_path, lambda *a, **k: {"status": "fine"})
    assert result["status"] == "error" and "'fine'" in result["error"]


# -- the text -------------------------------------------------------------------------


def _rows():
    cfg = ablate.Config
    return [
        ablate.result_row(
            cfg(name="baseline", kind="train", toggles={}),
            dict(
                status="ok",
                peak_allocated_bytes=4 << 20,
                peak_reserved_bytes=None,
                median_step_ms=100.0,
                tokens_per_s=1000.0,
                loss=5.0,
            ),
        ),
        ablate.result_row(
            cfg(name="ckpt", kind="train", toggles={"checkpointing": "full"}),
            dict(status="ok", peak_allocated_bytes=3 << 20, median_step_ms=125.0, tokens_per_s=800.0, loss=5.0),
        ),
        ablate.result_row(
            cfg(name="bf16", kind="train", toggles={"precision": "bf16"}),
            dict(status="oom", error="OutOfMemoryError: no room"),
        ),
        ablate.result_row(
            cfg(name="flash", kind="train", toggles={"attention": "flash"}, skip="x"),
            dict(status="skipped", error="attention=flash needs CUDA"),
        ),
    ]


def test_render_lines_up_toggles_numbers_and_reasons():
    text = render(ablate.build_table(_rows()))
    lines = text.splitlines()
    assert lines[0].split() == [
        "name",
        "checkpointing",
        "precision",
        "attention",
        "status",
        "peak",
        "alloc",
        "step",
        "ms",
        "tokens/s",
        "mem",
        "saved",
        "speed",
        "loss",
        "loss",
        "diff",
    ]
    assert lines[1].split() == [
        "baseline",
        "-",
        "-",
        "-",
        "ok",
        "4.00",
        "MiB",
        "100.0",
        "1,000",
        "+0.0%",
        "+0.0%",
        "5.0000",
        "+0.0000",
    ]
    assert lines[2].split() == [
        "ckpt",
        "full",
        "-",
        "-",
        "ok",
        "3.00",
        "MiB",
        "125.0",
        "800",
        "+25.0%",
        "-20.0%",
        "5.0000",
        "+0.0000",
    ]
    assert lines[3].split() == ["bf16", "-", "bf16", "-", "oom"]
    assert "peak reserved" not in text and "frag" not in text  # columns no row has (the CPU)
    assert lines[-2:] == ["  bf16   oom: OutOfMemoryError: no room", "  flash  skipped: attention=flash needs CUDA"]


def test_render_of_nothing():
    assert render(ablate.build_table([])) == "no configurations"


# -- the command line -----------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--vary", "precision"], "--vary expects KEY=A,B,..."),
        (["--vary", "precision="], "--vary expects KEY=A,B,..."),
        (["--vary", "a=1", "--vary", "a=2"], "--vary a given twice"),
        (["--vary", "a=1,1"], "repeats a value"),
        (["--set", "precision"], "--set expects KEY=VALUE"),
        (["--set", "a=1", "--vary", "a=2,3"], "both --vary and --set"),
        (["--steps", "0"], "argument --steps: expected a positive number"),
        (["--timeout", "soon"], "argument --timeout: expected a positive number"),
        (["--jobs", "0"], "argument --jobs: expected a positive number"),
        (["--suite", "nope"], "argument --suite: invalid choice"),
        (["--device", "tpu"], "argument --device: invalid choice"),
        (["--preset", "huge"], "unknown preset 'huge'"),
        (["--set", "precison=bf16"], "unknown train toggle(s) precison; known: precision,"),
        (["--suite", "kv", "--vary", "optimizer=sgd,adamw"], "unknown infer toggle(s) optimizer"),
    ],
)
def test_bad_arguments_are_one_line_usage_errors(capsys, monkeypatch, argv, message):
    monkeypatch.setattr(ablate, "launch", lambda *a: pytest.fail("no run may start"))
    assert main(["ablate", "--device", "cpu", *argv] if "--device" not in argv else ["ablate", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("vramscope: error: ") and message in err


def test_cuda_where_there_is_none_is_a_usage_error(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(["ablate", "--device", "cuda"]) == 2
    assert capsys.readouterr().err == "vramscope: error: --device cuda, but torch sees no CUDA device here\n"


def test_cli_prints_the_table_and_writes_it(fake_children, capsys, tmp_path):
    assert main(["ablate", "--suite", "kv", "--device", "cpu", "--out", str(tmp_path), "--steps", "3"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("vramscope ablate: suite kv, preset tiny, device cpu, 3 steps: 7 configurations in ")
    assert "kv-int8" in captured.out and "table: " in captured.out
    assert captured.err.count("\n") == 7 and "[7/7] prealloc+w-int8" in captured.err  # plain progress
    assert len(list(tmp_path.glob("ablation-kv-*.parquet"))) == 1


def test_cli_json_with_vary_and_set(fake_children, capsys, tmp_path):
    assert (
        main(
            [
                "ablate",
                "--vary",
                "precision=fp32,bf16",
                "--vary",
                "optimizer=adamw,sgd",
                "--set",
                "accumulation=2",
                "--device",
                "cpu",
                "--out",
                str(tmp_path),
                "--json",
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert out["vary"] == {"precision": ["fp32", "bf16"], "optimizer": ["adamw", "sgd"]}
    assert out["fixed"] == {"accumulation": 2}
    assert [r["name"] for r in out["rows"]] == [
        "precision=fp32,optimizer=adamw",
        "precision=fp32,optimizer=sgd",
        "precision=bf16,optimizer=adamw",
        "precision=bf16,optimizer=sgd",
    ]
    assert {r["config.accumulation"] for r in out["rows"]} == {"2"}
    assert [c["toggles"] for c in fake_children][1] == {"accumulation": 2, "precision": "fp32", "optimizer": "sgd"}
    assert Path(out["path"]).name.startswith("ablation-seeds-vary-")


# -- for real -------------------------------------------------------------------------


def _workloads_ready() -> bool:
    try:
        import workloads.infer
        import workloads.train
    except ImportError:
        return False
    return hasattr(workloads.train, "run") and hasattr(workloads.infer, "run")


def _ablate(tmp_path, suite) -> tuple[dict, float]:
    # Two runs at a time: each run is mostly a fresh interpreter importing torch, and the
    # checks here are of memory, which stays exact per process (CI wants both suites in 2 min).
    t0 = time.monotonic()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "profiler.cli",
            "ablate",
            "--preset",
            "tiny",
            "--suite",
            suite,
            "--steps",
            "5",
            "--device",
            "cpu",
            "--out",
            str(tmp_path),
            "--jobs",
            "2",
            "--json",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout), time.monotonic() - t0


@pytest.mark.slow
@pytest.mark.skipif(not _workloads_ready(), reason="workloads.train.run and workloads.infer.run not there yet")
def test_both_suites_for_real_on_the_cpu(tmp_path):
    from profiler.trace.summary_cache import load_summary

    seeds, seeds_s = _ablate(tmp_path, "seeds")
    kv, kv_s = _ablate(tmp_path, "kv")
    print(f"\nseeds: {seeds_s:.1f} s, kv: {kv_s:.1f} s, both: {seeds_s + kv_s:.1f} s")
    for out in (seeds, kv):
        for row in out["rows"]:
            assert row["status"] == "ok" or (row["status"] == "skipped" and row["note"]), row
            if row["status"] == "ok":
                assert row["peak_allocated_bytes"] > 0 and row["median_step_ms"] > 0, row
        print(render(pd.read_parquet(out["path"])))
    rows = {r["name"]: r for r in seeds["rows"]}
    assert all(math.isfinite(r["loss"]) for r in seeds["rows"] if r["status"] == "ok")
    sgd = load_summary(rows["sgd"]["run_dir"])
    assert sgd["category_peak_bytes"].get("optimizer_state", 0) == 0
    assert load_summary(rows["baseline"]["run_dir"])["category_peak_bytes"]["optimizer_state"] > 0
    base_act = load_summary(rows["baseline"]["run_dir"])["category_peak_bytes"]["activation"]
    assert load_summary(rows["ckpt-full"]["run_dir"])["category_peak_bytes"]["activation"] < base_act
