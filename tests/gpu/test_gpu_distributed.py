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
REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("variant", ["ddp", "fsdp-zero3", "fsdp-offload"])
def test_each_rank_replays_its_own_gpu(tmp_path, variant):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        "-m",
        "workloads.distributed",
        "--preset",
        "tiny",
        "--variant",
        variant,
        "--steps",
        "4",
        "--out",
        str(tmp_path),
    ]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=300, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO))
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout[proc.stdout.index("{") :])
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


NCCL_SCRIPT = """
import os, signal, time
import torch, torch.distributed as dist
from torch import nn
local = int(os.environ["LOCAL_RANK"])
torch.cuda.set_device(local)  # after vramscope's capture started: it must already record this GPU
dist.init_process_group("nccl", device_id=torch.device("cuda", local))
torch.manual_seed(0)
model = nn.parallel.DistributedDataParallel(
    nn.Sequential(nn.Linear(1024, 4096), nn.GELU(), nn.Linear(4096, 1024)).cuda(), device_ids=[local])
opt = torch.optim.AdamW(model.parameters())
die_at = int(os.environ.get("DIE_AT", -1))
for step in range(4):
    model(torch.randn(64, 1024, device="cuda")).square().mean().backward()
    if dist.get_rank() == 1 and step == die_at:  # mid-step, its forward and backward done
        os.kill(os.getpid(), signal.SIGKILL)
    opt.step()
    opt.zero_grad()
    time.sleep(0.6)  # past the capture's drain interval: what a killed rank wrote is on disk
torch.cuda.synchronize()
dist.destroy_process_group()
"""


@pytest.mark.parametrize("die_at", [None, 2])
def test_vramscope_run_under_torchrun(tmp_path, die_at):
    script = tmp_path / "ddp_nccl.py"
    script.write_text(NCCL_SCRIPT)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        "-m",
        "profiler.cli",
        "run",
        "--out",
        str(tmp_path / "t"),
        str(script),
    ]
    env = dict(os.environ, PYTHONPATH=str(REPO), **({"DIE_AT": str(die_at)} if die_at else {}))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    assert (proc.returncode == 0) == (die_at is None), proc.stderr[-3000:]
    (job,) = [p for p in (tmp_path / "t").iterdir() if p.is_dir()]
    from profiler.trace.reader import load_trace

    for rank in (0, 1):
        trace = load_trace(job / f"rank={rank}")
        assert trace.meta["device_index"] == rank and trace.meta["run_id"] == job.name
        assert set(trace.steps["step"]) >= {0, 1}
        if die_at is None:
            ev, meta = load_events(job / f"rank={rank}")
            peak, _ = replay(ev, meta["baseline_allocated_bytes"])
            assert peak == meta["max_allocated_bytes"] and meta["dist_backend"] == "nccl"
            assert {"parameter", "gradient", "optimizer_state"} <= set(ev["category"].astype(str))
            print(f"[vramscope run rank {rank}] peak {peak:,} B on cuda:{meta['device_index']}")
        else:
            print(
                f"[rank {rank} after rank 1 died] status {trace.meta.get('status')}, "
                f"steps {sorted(set(trace.steps['step']))}"
            )
