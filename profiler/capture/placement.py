"""Where one capture writes its run, and what its meta.json says from the start.

Decided per capture, not per Profiler: under torchrun a Profiler entered again
starts a run of its own.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass

import torch

from profiler.capture import distributed
from profiler.capture.options import CaptureOptions
from profiler.trace.writer import TraceWriter

_DIST_CAPTURES = itertools.count()  # this process's captures under torchrun, numbered


@dataclass(frozen=True)
class Placement:
    run_id: str | None  # None: the writer makes a fresh one
    subdir: str | None  # a partition of the run directory ("rank=3")
    extra_meta: dict
    config: dict


def place(options: CaptureOptions, rank: distributed.RankInfo | None) -> Placement:
    """The run directory of a capture; a rank's partition of a shared run under torchrun."""
    extra_meta, config = dict(options.extra_meta), dict(options.config)
    if rank is None:
        return Placement(options.run_id, options.subdir, extra_meta, config)
    config.setdefault("world_size", rank.world_size)
    assert options.name is not None  # CaptureOptions fills in "run"
    run_id = options.run_id or distributed.shared_run_id(options.name, rank, nth=next(_DIST_CAPTURES))
    return Placement(run_id, rank.partition, {**rank.meta(), **extra_meta}, config)


def open_writer(
    options: CaptureOptions, place: Placement, backend_name: str, facts: dict, write_behind: bool = False
) -> TraceWriter:
    """Make the run directory and its first meta.json; `facts` are the started backend's;
    `write_behind`: the journals are written by a thread of the writer's own (TraceWriter)."""
    meta = dict(
        backend=backend_name,
        torch_version=torch.__version__,
        config=place.config,
        max_allocated_bytes=None,
        max_reserved_bytes=None,
        events_dropped=0,
        capture=dict(
            stacks=options.stacks,
            modules=options.modules,
            hooked_steps=options.hooked_steps,
            max_entries=options.max_entries,
        ),
        **facts,
        **place.extra_meta,
    )
    meta.setdefault("allocator_settings", None)
    meta["alloc_conf_env"] = os.environ.get("PYTORCH_CUDA_ALLOC_CONF") or os.environ.get("PYTORCH_ALLOC_CONF")
    assert options.name is not None  # CaptureOptions fills in "run"
    return TraceWriter(
        options.out, options.name, meta, run_id=place.run_id, subdir=place.subdir, write_behind=write_behind
    )
