"""Multi-GPU capture: run with `pytest -m gpu` on a machine with two or more GPUs.

Each rank must record its own GPU (LOCAL_RANK's, chosen before the script picks
it), and each partition's replay must equal that GPU's allocator counters.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from gpu_oracle import allocated_at_step_ends, load_events, replay

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices"),
]
REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("variant", ["ddp", "fsdp-zero3", "fsdp-offload"])
def test_each_rank_replays_its_own_gpu(tmp_path, variant):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "workloads.distributed", "--preset", "tiny", "--variant", variant, "--steps", "4",
           "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout[proc.stdout.index("{"):])
    (job,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    for rank in (0, 1):
        run = job / f"rank={rank}"
        ev, meta = load_events(run)
        assert meta["device_index"] == rank and meta["dist_backend"] == "nccl"
        peak, _ = replay(ev, meta["baseline_allocated_bytes"])
        assert peak == meta["max_allocated_bytes"] == result["ranks"][rank]["peak_allocated_bytes"]
        steps = pq.read_table(run / "steps.parquet").to_pandas()
        ends = allocated_at_step_ends(ev, meta["baseline_allocated_bytes"])
        assert meta.get("block_replay_misses") == 0
        for step, allocated in zip(steps["step"], steps["allocated_bytes"]):
            if int(step) in ends:
                assert ends[int(step)] == int(allocated), (rank, int(step))
        cats = set(ev["category"].astype(str))
        if variant != "ddp":
            assert {"all_gather", "unsharded_parameter", "reduce_scatter"} <= cats
        print(f"[{variant} rank {rank}] peak {peak:,} B on cuda:{meta['device_index']}")
