"""One capture per rank of a distributed job, all in one run directory.

Under torchrun (or any launcher that sets RANK and WORLD_SIZE) every rank
writes its own partition of a shared run directory:

    <out>/<run_id>/rank=0/...   <out>/<run_id>/rank=1/...

hive-style, so duckdb, Polars or Spark read a whole job as one dataset with a
`rank` column. Ranks never wait for each other to write: a rank that dies
leaves its own journals and every other rank's data as they were.

The ranks agree on the run id before any process group exists (the capture may
start before the script calls init_process_group): through torchrun's own
key-value store when there is one, else from what marks the launch (shared_run_id).
"""

from __future__ import annotations

import datetime
import hashlib
import os
from dataclasses import dataclass

from profiler.trace.meta import process_started_at
from profiler.trace.writer import new_run_id, run_slug

RUN_ID_ENV = "VRAMSCOPE_RUN_ID"
_STORE_TIMEOUT = datetime.timedelta(seconds=30)


@dataclass(frozen=True)
class RankInfo:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int

    @property
    def partition(self) -> str:
        return f"rank={self.rank}"

    def meta(self) -> dict:
        return dict(
            rank=self.rank,
            world_size=self.world_size,
            local_rank=self.local_rank,
            local_world_size=self.local_world_size,
        )


def _env_int(env, key: str) -> int | None:
    try:
        return int(env[key])
    except (KeyError, ValueError):
        return None


def rank_from_env(env=None) -> RankInfo | None:
    """This process's place in a distributed job, or None outside one."""
    env = os.environ if env is None else env
    rank, world = _env_int(env, "RANK"), _env_int(env, "WORLD_SIZE")
    if rank is None or world is None or world < 1 or not 0 <= rank < world:
        return None
    local = _env_int(env, "LOCAL_RANK")
    local_world = _env_int(env, "LOCAL_WORLD_SIZE")
    return RankInfo(
        rank=rank,
        world_size=world,
        local_rank=rank if local is None else local,
        local_world_size=world if local_world is None else local_world,
    )


def _launch_identity(env) -> str | None:
    """What every rank of one launch sees alike, without talking to the others, and no other
    launch sees: None when nothing marks the launch. MASTER_ADDR and MASTER_PORT name where a
    job meets, not which launch it is: every single-node run on the default port shares them."""
    marks = []
    for key in ("SLURM_JOB_ID", "SLURM_STEP_ID"):
        if env.get(key):
            marks.append(f"{key}={env[key]}")
    if env.get("TORCHELASTIC_RUN_ID", "none") not in ("", "none"):  # torchrun --standalone: a fresh uuid
        marks.append(f"TORCHELASTIC_RUN_ID={env['TORCHELASTIC_RUN_ID']}")
    if env.get("LOCAL_WORLD_SIZE") == env.get("WORLD_SIZE"):
        # One node: the ranks share their launcher, a process of its own per launch
        # (its start time tells it from a later process that reuses its pid).
        launcher = os.getppid()
        marks.append(f"launcher={launcher}@{process_started_at(launcher)}")
    if not marks:
        return None
    keys = ("TORCHELASTIC_RESTART_COUNT", "MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE")
    return "|".join(marks + [f"{k}={env.get(k, '')}" for k in keys])


def shared_run_id(name: str, info: RankInfo, env=None, nth: int = 0) -> str:
    """The run id every rank of this launch uses, and no other launch.

    VRAMSCOPE_RUN_ID wins. A job of one process shares its id with no one: a fresh id.
    Under torchrun, the first rank to ask proposes a fresh id in the launcher's store and
    every rank reads back the one that was kept. Without a store, the id is derived from
    what marks the launch (a SLURM job step, torchrun's run id, the launcher process on
    one node); without any of those, each rank takes a fresh id of its own.
    `nth` numbers a process's captures: the n-th capture of every rank shares one
    id, and the next capture gets another.
    """
    env = os.environ if env is None else env
    suffix = f"-{nth}" if nth else ""
    if env.get(RUN_ID_ENV):
        return env[RUN_ID_ENV] + suffix
    if info.world_size == 1:
        return new_run_id(name)
    agreed = _agree_through_store(f"{name}/{nth}", name, env)
    if agreed:
        return agreed
    launch = _launch_identity(env)
    if launch is None:
        return new_run_id(name)
    digest = hashlib.sha1(launch.encode()).hexdigest()[:10]
    return f"{run_slug(name)}-job-{digest}{suffix}"


def _agree_through_store(key_name: str, name: str, env) -> str | None:
    # torchrun's agent serves a store at MASTER_ADDR:MASTER_PORT for its workers.
    if env.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() != "true":
        return None
    try:
        import torch.distributed as dist

        store = dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), is_master=False, timeout=_STORE_TIMEOUT)
        key = "vramscope/run_id/{}/{}/{}".format(
            env.get("TORCHELASTIC_RUN_ID", ""), env.get("TORCHELASTIC_RESTART_COUNT", "0"), key_name
        )
        kept = store.compare_set(key, "", new_run_id(name))
        return kept.decode() if isinstance(kept, bytes) else str(kept)
    except Exception:  # noqa: BLE001 - no store: fall back to the job identity
        return None


def device_index(info: RankInfo | None) -> int | None:
    """The CUDA device a rank uses by torchrun's convention (LOCAL_RANK), if it exists."""
    import torch

    if info is None or not torch.cuda.is_available():
        return None
    count = torch.cuda.device_count()
    return info.local_rank if info.local_rank < count else None


def late_facts() -> dict:
    """Facts known only once the script initialized its process group."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dict(dist_backend=str(dist.get_backend()))
    except Exception:  # noqa: BLE001 - meta is best effort here
        pass
    return {}
