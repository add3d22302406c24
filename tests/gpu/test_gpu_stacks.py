"""Which line made the peak: the share of bytes alive at the peak that carry no stack.

The bundled run's configuration (gpt2-small, bf16 autocast, fused AdamW, B8x1024) is
captured fresh, eager and torch.compile'd, the way a user runs it: the workload starts
the capture before it builds the model, so parameters carry their stacks too. Each
trace is kept under $VRAMSCOPE_KEEP_TRACES when that is set (to ship it in traces/).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from profiler.analysis.live import alive_at_peak
from profiler.trace.reader import load_trace

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
REPO = Path(__file__).resolve().parents[2]
BUNDLED = ["--preset", "gpt2-small", "--precision", "bf16", "--optimizer", "adamw_fused", "--device", "cuda"]


def no_stack_share(trace) -> dict:
    """Bytes alive at the peak, split by whether a stack names the line that made them."""
    live = alive_at_peak(trace)
    total = int(live["size_bytes"].sum())
    bare = live[live["stack_id"].isna()]
    by_category = bare.groupby(bare["category"].astype(object).fillna("-"))["size_bytes"].sum()
    return dict(
        peak_bytes=total,
        no_stack_bytes=int(bare["size_bytes"].sum()),
        share=float(bare["size_bytes"].sum()) / max(total, 1),
        no_stack_by_category={k: int(v) for k, v in by_category.items()},
    )


def _capture(tmp_path: Path, name: str, extra: list[str]) -> Path:
    out = Path(os.environ.get("VRAMSCOPE_KEEP_TRACES") or tmp_path)
    cmd = [sys.executable, "-m", "workloads.train", *BUNDLED, *extra, "--out", str(out), "--name", name]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    subprocess.run(cmd, check=True, cwd=REPO, env=env, timeout=400, stdout=subprocess.DEVNULL)
    (run_dir,) = [p.parent for p in out.rglob("meta.json") if json.loads(p.read_text()).get("name") == name]
    return run_dir


@pytest.mark.parametrize(
    "name, extra",
    [
        ("gpt2-small-bf16", ["--steps", "3"]),
        ("gpt2-small-bf16-compiled", ["--steps", "20", "--compile"]),
    ],
)
def test_at_most_5_percent_of_the_peak_has_no_stack(tmp_path, name, extra):
    run_dir = _capture(tmp_path, name, extra)
    meta = json.loads((run_dir / "meta.json").read_text())
    measured = no_stack_share(load_trace(run_dir))
    print(
        f"\n{name}: {measured['no_stack_bytes']:,} of {measured['peak_bytes']:,} B at the peak have no stack "
        f"({100 * measured['share']:.2f}%), by category {measured['no_stack_by_category']}; "
        f"capture path {meta.get('capture_path')}, {meta.get('device')}, torch {meta.get('torch_version')}"
    )
    assert meta["max_allocated_bytes"] == measured["peak_bytes"]
    assert measured["share"] <= 0.05, measured
