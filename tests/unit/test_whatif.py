"""vramscope whatif: the per-category linear fit, the largest batch that fits, mixed setups refused,
and a real CPU check (tiny preset at two batch sizes predicts a third)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from profiler.cli import main
from profiler.whatif import (
    WhatIfError,
    check_same_setup,
    fit,
    fit_line,
    largest_fitting,
    parse_size,
    point_from_summary,
    whatif,
)

GiB = 1 << 30
MiB = 1 << 20


def summary(batch, cats, reserved=None, name=None, **config):
    return {
        "name": name or f"b{batch}",
        "device": "NVIDIA H100 80GB HBM3",
        "config": {
            "preset": "gpt2-small",
            "precision": "bf16",
            "batch_size": batch,
            "tokens_per_step": batch * 1024,
            **config,
        },
        "categories_at_peak_bytes": cats,
        "peak_allocated_bytes": sum(cats.values()),
        "peak_reserved_bytes": reserved,
        "allocator_max_reserved_bytes": None,
    }


def test_fit_line_two_points_is_exact():
    assert fit_line([4, 8], [10, 18]) == (2.0, 2.0)
    fixed, slope = fit_line([1, 2, 3], [1, 2, 4])  # least squares: slope 1.5, fixed -2/3
    assert slope == pytest.approx(1.5) and fixed == pytest.approx(-2 / 3)


def test_fit_per_category_two_runs_exact():
    p4 = point_from_summary(summary(4, {"parameter": 500 * MiB, "activation": 4 * GiB, "temporary": 100 * MiB}))
    p8 = point_from_summary(summary(8, {"parameter": 500 * MiB, "activation": 8 * GiB, "temporary": 150 * MiB}))
    m = fit([p4, p8])
    assert m.categories["parameter"] == (500 * MiB, 0)
    assert m.categories["activation"] == pytest.approx((0, GiB))
    assert m.categories["temporary"] == pytest.approx((50 * MiB, 12.5 * MiB))
    for p in (p4, p8):  # through both points, per category and in total
        assert m.allocated(p.x) == pytest.approx(p.allocated)
        for c, b in p.categories.items():
            assert m.by_category(p.x)[c] == pytest.approx(b)


def test_prediction_arithmetic_by_hand():
    # allocated(B) = 2 GiB + 1 GiB * B; ratios 1.05 and 1.10 -> 1.10 is used.
    p4 = point_from_summary(summary(4, {"parameter": 2 * GiB, "activation": 4 * GiB}, reserved=int(6.3 * GiB)))
    p8 = point_from_summary(summary(8, {"parameter": 2 * GiB, "activation": 8 * GiB}, reserved=11 * GiB))
    m = fit([p4, p8])
    assert m.overhead_ratio == pytest.approx(1.10)
    # budget 80 GiB - 1 GiB = 79 GiB: 1.1 * (2 + B) <= 79  ->  B <= 69.81  ->  69
    assert largest_fitting(m, 79 * GiB) == 69
    r = whatif([p8, p4], device_memory=80 * GiB, margin=GiB)
    assert r["largest"] == 69 and r["budget_bytes"] == 79 * GiB
    assert r["at_largest"]["allocated_bytes"] == 71 * GiB
    assert r["at_largest"]["reserved_bytes"] == pytest.approx(1.1 * 71 * GiB, abs=1)
    assert r["at_over"]["batch_size"] == 76  # ceil(69 * 1.1)
    assert r["at_over"]["reserved_bytes"] > 79 * GiB
    assert [p["batch_size"] for p in r["runs"]] == [4, 8]


def test_device_memory_from_meta_and_sizes():
    meta = {"device_total_bytes": 85017493504}
    pts = [point_from_summary(summary(b, {"parameter": GiB, "activation": b * GiB}), meta=meta) for b in (4, 8)]
    r = whatif(pts, margin=0)
    assert r["device_memory_bytes"] == 85017493504 and r["largest"] == 78  # (79.18 - 1) GiB / 1 GiB
    assert parse_size("80GiB") == 80 * GiB and parse_size("1.5 GB") == 1_500_000_000
    with pytest.raises(WhatIfError):
        parse_size("eighty")
    pts_cpu = [dataclasses.replace(p, device_total=None) for p in pts]
    with pytest.raises(WhatIfError, match="--device-memory"):
        whatif(pts_cpu)


def test_mixed_setups_refused():
    a = point_from_summary(summary(4, {"activation": GiB}))
    b = point_from_summary(summary(8, {"activation": 2 * GiB}, checkpointing="full"))
    with pytest.raises(WhatIfError, match="checkpointing"):
        check_same_setup([a, b])
    c = point_from_summary(summary(4, {"activation": 2 * GiB}, name="again"))
    with pytest.raises(WhatIfError, match="two different batch_size"):
        check_same_setup([a, c])
    with pytest.raises(WhatIfError, match="two or more"):
        check_same_setup([a])
    no_batch = summary(4, {"activation": GiB})
    del no_batch["config"]["batch_size"]
    with pytest.raises(WhatIfError, match="does not record"):
        point_from_summary(no_batch)
    assert point_from_summary(no_batch, x=4).x == 4


def test_seq_axis_reads_seq_len():
    s = summary(8, {"activation": GiB}, seq_len=512)
    assert point_from_summary(s, "seq").x == 512


# -- a real CPU check ------------------------------------------------------------------


def _train(tmp_path, monkeypatch, batch: int) -> Path:
    """The tiny preset at `batch`. Where train.run takes `batch_size` as a toggle it is passed so
    (and recorded in meta's config); otherwise the preset is replaced for the call and the
    batch is written into meta's config afterwards."""
    import workloads.train as train
    from workloads.model import preset

    if "batch_size" in getattr(train, "SHAPE_KEYS", ()):
        toggles = {"batch_size": batch}
    else:
        toggles = {}
        monkeypatch.setattr(train, "model_preset", lambda name: dataclasses.replace(preset(name), batch_size=batch))
    result = train.run("tiny", toggles, out=str(tmp_path), name=f"tiny-b{batch}", steps=2, device="cpu")
    assert result["status"] == "ok", result
    meta_path = Path(result["run_dir"]) / "meta.json"
    meta = json.loads(meta_path.read_text())
    if meta["config"].get("batch_size") != batch:
        assert "batch_size" not in meta["config"]
        meta["config"]["batch_size"] = batch
        meta_path.write_text(json.dumps(meta))
    return Path(result["run_dir"])


def test_cpu_runs_predict_a_third_batch(tmp_path, monkeypatch, capsys):
    from profiler.trace.summary_cache import load_summary

    runs = {b: _train(tmp_path, monkeypatch, b) for b in (2, 8, 16)}
    pts = [point_from_summary(load_summary(runs[b])) for b in (2, 8)]
    m = fit(pts)
    measured = load_summary(runs[16])["peak_allocated_bytes"]
    predicted = m.allocated(16)
    print(
        f"tiny cpu: batch 16 predicted {predicted:.0f} B, measured {measured} B, "
        f"error {(predicted - measured) / measured * 100:+.3f}%"
    )
    assert predicted == pytest.approx(measured, rel=0.03)

    # The verb end to end, on the same runs.
    capsys.readouterr()
    rc = main(["whatif", str(runs[2]), str(runs[8]), "--device-memory", "64MiB", "--margin", "0", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert out["largest"] == largest_fitting(m, 64 * MiB)
    assert out["at_largest"]["reserved_bytes"] <= 64 * MiB < out["at_over"]["reserved_bytes"]
    rc = main(["whatif", str(runs[2]), str(runs[8]), "--device-memory", "2GiB"])
    assert rc == 0 and "largest that fits" in capsys.readouterr().out


TRACES = Path(__file__).resolve().parents[2] / "traces"


def test_cli_refuses_mixed_setup_in_one_line(capsys):
    rc = main(
        [
            "whatif",
            str(TRACES / "gpt2-small-bf16-h100"),
            "--values",
            "8,8",
            next(str(p) for p in (TRACES / "h100-ablation-seeds").glob("ablate-seeds-bf16-2*")),
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and err.startswith("vramscope: error:")
