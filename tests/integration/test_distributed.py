"""Multi-rank capture on the CPU: torchrun, 2 processes, the gloo backend.

Each job below is a real torchrun launch: rank partitions of one shared run,
FSDP2's categories against torch's FSDPMemTracker, `vramscope run` under
torchrun, and a rank killed mid-training.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

from profiler.capture import distributed
from profiler.trace.reader import load_trace
from tests.gpu_oracle import load_events, replay

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch built without distributed")


def torchrun(*args, ranks: int = 2, timeout: float = 240, env: dict | None = None):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}", *args]
    full_env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=REPO)


def only_child(folder: Path) -> Path:
    children = [c for c in folder.iterdir() if c.is_dir()]
    assert len(children) == 1, children
    return children[0]


# -- the shared run id ------------------------------------------------------------------


def test_rank_from_env():
    info = distributed.rank_from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"})
    assert (info.rank, info.world_size, info.local_rank, info.partition) == (3, 4, 1, "rank=3")
    assert distributed.rank_from_env({}) is None
    assert distributed.rank_from_env({"RANK": "4", "WORLD_SIZE": "4"}) is None
    assert distributed.rank_from_env({"RANK": "x", "WORLD_SIZE": "4"}) is None


def test_run_id_from_the_environment_wins():
    info = distributed.RankInfo(rank=1, world_size=2, local_rank=1, local_world_size=2)
    assert distributed.shared_run_id("job", info, {"VRAMSCOPE_RUN_ID": "mine", "WORLD_SIZE": "2"}) == "mine"


def test_run_id_without_a_store_comes_from_the_job_identity():
    env = {
        "MASTER_ADDR": "node0",
        "MASTER_PORT": "29500",
        "WORLD_SIZE": "16",
        "LOCAL_WORLD_SIZE": "8",
        "SLURM_JOB_ID": "4242",
    }
    ranks = [distributed.RankInfo(rank=r, world_size=16, local_rank=r % 8, local_world_size=8) for r in (0, 9)]
    ids = {distributed.shared_run_id("train", info, env) for info in ranks}
    assert len(ids) == 1 and ids.pop().startswith("train-job-")
    other = distributed.shared_run_id("train", ranks[0], {**env, "SLURM_JOB_ID": "4243"})
    assert other != distributed.shared_run_id("train", ranks[0], env)


def test_run_id_through_the_launchers_store():
    store = dist.TCPStore(
        "127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=datetime.timedelta(seconds=10)
    )
    env = {
        "TORCHELASTIC_USE_AGENT_STORE": "True",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(store.port),
        "TORCHELASTIC_RUN_ID": "abc",
        "WORLD_SIZE": "2",
        "LOCAL_WORLD_SIZE": "2",
    }
    ids = [
        distributed.shared_run_id(
            "job", distributed.RankInfo(rank=r, world_size=2, local_rank=r, local_world_size=2), env
        )
        for r in (1, 0)
    ]
    assert ids[0] == ids[1] and ids[0].startswith("job-") and "-job-" not in ids[0]


# -- real jobs ----------------------------------------------------------------------------


def test_fsdp_job_writes_one_partition_per_rank(tmp_path):
    proc = torchrun(
        "-m",
        "workloads.distributed",
        "--preset",
        "tiny",
        "--variant",
        "fsdp-zero3",
        "--steps",
        "3",
        "--out",
        str(tmp_path),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout[proc.stdout.index("{") :])
    job = only_child(tmp_path)
    assert result["run_dir"] == str(job)
    assert sorted(p.name for p in job.iterdir()) == ["rank=0", "rank=1"]
    losses = []
    for rank in (0, 1):
        trace = load_trace(job / f"rank={rank}")
        meta = trace.meta
        assert (meta["rank"], meta["world_size"], meta["run_id"]) == (rank, 2, job.name)
        assert meta["dist_backend"] == "gloo" and meta["status"] == "complete"
        assert meta["config"]["parallel"] == "fsdp" and meta["config"]["world_size"] == 2
        ev, _ = load_events(job / f"rank={rank}")
        assert replay(ev, meta["baseline_allocated_bytes"])[0] == meta["max_allocated_bytes"]
        seen = set(trace.events["category"].astype(str))
        assert {
            "parameter",
            "unsharded_parameter",
            "all_gather",
            "reduce_scatter",
            "unsharded_gradient",
            "gradient",
            "optimizer_state",
            "activation",
        } <= seen
        assert result["ranks"][rank]["peak_allocated_bytes"] == meta["max_allocated_bytes"]
        losses.append(result["ranks"][rank])
    assert result["peak_allocated_bytes"] == max(r["peak_allocated_bytes"] for r in result["ranks"])


@pytest.mark.parametrize("variant", ["fsdp-zero3", "fsdp-bf16-ckpt"])
def test_fsdp_categories_agree_with_fsdp_mem_tracker(tmp_path, variant):
    out = tmp_path / "check.json"
    proc = torchrun("-m", "workloads.fsdp_check", "--preset", "tiny", "--variant", variant, "--json", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    for rank in report["ranks"]:
        for moment, rows in rank["tables"].items():
            if moment == "step peak":
                assert sum(rank["vramscope_raw"][moment].values()) == rank["peak"]
            held = {r["category"] for r in rows if r["held"]}
            assert {"parameter", "total without other"} <= held, (moment, held)
            if moment == "step peak":
                assert "unsharded_parameter" in held
            for r in rows:
                if r["held"]:
                    assert abs(r["diff_pct"]) <= 5.0, (moment, r)
        after = {r["category"]: r for r in rank["tables"]["after optimizer step"]}
        assert after["gradient"]["held"] and after["optimizer_state"]["held"]
        if variant == "fsdp-bf16-ckpt":  # its peak is late in backward, during a reduce-scatter
            at_peak = {r["category"]: r for r in rank["tables"]["step peak"]}
            assert at_peak["reduce_scatter"]["held"] and at_peak["unsharded_parameter"]["held"]


DDP_SCRIPT = """
import os, signal, sys
import torch, torch.distributed as dist
from torch import nn
dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
model = nn.parallel.DistributedDataParallel(nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 64)))
opt = torch.optim.AdamW(model.parameters())
die_at = int(os.environ.get("DIE_AT", -1))
for step in range(4):
    if rank == 1 and step == die_at:
        os.kill(os.getpid(), signal.SIGKILL)
    model(torch.randn(32, 64)).square().mean().backward()
    opt.step()
    opt.zero_grad()
print(f"rank {rank} done")
dist.destroy_process_group()
"""


def test_vramscope_run_under_torchrun(tmp_path):
    script = tmp_path / "ddp_script.py"
    script.write_text(DDP_SCRIPT)
    proc = torchrun("-m", "profiler.cli", "run", "--out", str(tmp_path / "t"), str(script))
    assert proc.returncode == 0, proc.stderr[-3000:]
    job = only_child(tmp_path / "t")
    assert job.name.startswith("ddp_script-")
    for rank in (0, 1):
        trace = load_trace(job / f"rank={rank}")
        assert trace.meta["rank"] == rank and trace.meta["world_size"] == 2
        assert trace.meta["command"] == [str(script)]
        assert trace.meta["dist_backend"] == "gloo"  # recorded although the script destroyed its group
        assert len(trace.steps) >= 4
        cats = set(trace.events["category"].astype(str))
        assert {"parameter", "gradient", "optimizer_state"} <= cats


def test_a_dead_rank_leaves_the_other_ranks_data(tmp_path):
    script = tmp_path / "ddp_script.py"
    script.write_text(DDP_SCRIPT)
    proc = torchrun("-m", "profiler.cli", "run", "--out", str(tmp_path / "t"), str(script), env={"DIE_AT": "2"})
    assert proc.returncode != 0
    job = only_child(tmp_path / "t")
    survivor = load_trace(job / "rank=0")  # stopped by torchrun after rank 1 died: journals or parquet
    dead = load_trace(job / "rank=1")  # killed at its third step: its journals
    assert dead.meta.get("status") in (None, "running")
    assert set(dead.steps["step"]) >= {0, 1}
    assert set(survivor.steps["step"]) >= {0, 1}
    for trace in (survivor, dead):
        assert trace.meta["run_id"] == job.name


def test_a_second_capture_of_the_job_gets_a_run_of_its_own():
    env = {"MASTER_ADDR": "node0", "MASTER_PORT": "29500", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}
    info = distributed.RankInfo(rank=0, world_size=2, local_rank=0, local_world_size=2)
    first, second = (distributed.shared_run_id("job", info, env, nth=n) for n in (0, 1))
    assert first != second and second == first + "-1"
