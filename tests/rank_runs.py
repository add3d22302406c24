"""Hand-made multi-rank runs: one rank=N partition per rank, written through the real writer (fakes).

Every rank runs the same two steps; only its activation differs, so its peak is worked out by hand:

    parameter 1000 B (alive throughout) + activation + gradient 500 B, in each step's backward

Step s of rank r ends at 2_000 + step_us(r) * s, so each rank has its own median step time.
"""

from __future__ import annotations

from pathlib import Path

from fakes import write_trace

PARAM, GRAD = 1000, 500
STEP_EVENTS = 7  # events before step 1 begins (the parameter and step 0's six)


def peak_of(activation: int) -> int:
    return PARAM + activation + GRAD


def step_us(rank: int) -> int:
    return 100 * (rank + 1)


def freed(addr, size, phase, module, category=None):
    return [
        ("free_requested", addr, size, phase, module, category),
        ("free_completed", addr, size, phase, module, category),
    ]


def rank_events(activation: int) -> list[tuple]:
    events = [("alloc", 0x100, PARAM, "forward", "model", "parameter")]
    for step in range(2):
        act = 0x1000 * (step + 1)
        events += [
            ("alloc", act, activation, "forward", "l1"),
            ("alloc", act + 0x100, GRAD, "backward", "l1", "gradient"),
            *freed(act, activation, "backward", "l1"),
            *freed(act + 0x100, GRAD, "optimizer", None),
        ]
    return events


def write_rank(
    out: Path, run_id: str, rank: int, activation: int, world_size: int, *, status="complete", name: str = "job"
) -> Path:
    """One rank's partition. status=None leaves journals only, as a rank killed mid-capture does (its meta
    has no allocator maximum yet, as a capture's has none before it finalizes)."""
    extra = {} if status else dict(max_allocated_bytes=None)
    steps = [
        dict(
            step=s,
            ts_us=2_000 + step_us(rank) * s,
            allocated_bytes=PARAM,
            reserved_bytes=None,
            max_allocated_bytes=peak_of(activation),
        )
        for s in range(2)
    ]
    return write_trace(
        out,
        rank_events(activation),
        name=name,
        run_id=run_id,
        subdir=f"rank={rank}",
        status=status,
        steps=steps,
        step_of=lambda i: 0 if i < STEP_EVENTS else 1,
        rank=rank,
        local_rank=rank % 8,
        world_size=world_size,
        dist_backend="gloo",
        max_reserved_bytes=4 * peak_of(activation) if status else None,
        config={"world_size": world_size, "parallel": "fsdp", "reshard_after_forward": True},
        **extra,
    )


def write_job(
    out: Path,
    run_id: str,
    activations: dict[int, int],
    world_size: int | None = None,
    statuses: dict[int, str | None] | None = None,
    name: str = "job",
) -> Path:
    """A job with the given ranks (rank -> activation bytes); ranks below world_size left out are missing."""
    world_size = world_size or len(activations)
    statuses = statuses or {}
    for rank, activation in activations.items():
        write_rank(out, run_id, rank, activation, world_size, status=statuses.get(rank, "complete"), name=name)
    return Path(out) / run_id
