"""Hand-built runs for the analysis tests, with their right answers worked out by hand in exact bytes.

Allocated bytes drop at free_requested, active bytes at free_completed (torch's caching
allocator: DeviceCachingAllocator::free and free_block):

- CPU_EVENTS: a CPU run with 10,000 bytes alive before capture (no blocks to show for
  them), two modules, a gradient, an optimizer temporary; every free is free_requested
  then, at once, free_completed, as the CPU backend records them. The peak is 14,500
  bytes at event 5.
- CUDA_EVENTS: a CUDA run over a hand-drawn address space: two start segments (one with
  a free gap between two live blocks, one holding a block still pending free from before
  capture) plus a segment allocated during the run. Two frees complete three events after
  they were requested, so allocated and active bytes differ.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from fakes import write_trace

from profiler.trace import schema
from profiler.trace.model import Trace


def load(run_dir: Path) -> Trace:
    """The trace as analysis sees it, read straight from the Parquet files (no reader logic)."""
    meta = json.loads((run_dir / schema.META_FILE).read_text())
    tables = {t: pq.read_table(run_dir / schema.parquet_name(t)).to_pandas() for t in schema.TABLE_NAMES}
    return Trace(path=run_dir, meta=meta, **tables)


def freed(addr, size, phase, module, category=None):
    """A free as both backends record it: requested, then completed at once."""
    return [
        ("free_requested", addr, size, phase, module, category),
        ("free_completed", addr, size, phase, module, category),
    ]


# -- the CPU run ------------------------------------------------------------------------
CPU_BASELINE = 10_000
CPU_EVENTS = [
    ("alloc", 0x1000, 1000, "forward", "l1"),  # 0  activation: freed in backward
    ("alloc", 0x2000, 200, "forward", "l1"),  # 1  temporary: freed in forward
    *freed(0x2000, 200, "forward", "l1"),  # 2, 3
    ("alloc", 0x3000, 3000, "forward", "l2"),  # 4  activation
    ("alloc", 0x4000, 500, "backward", "l2", "gradient"),  # 5  the peak: 14,500
    *freed(0x3000, 3000, "backward", "l2"),  # 6, 7
    *freed(0x1000, 1000, "backward", "l1"),  # 8, 9
    ("alloc", 0x5000, 700, "optimizer", None),  # 10
    *freed(0x5000, 700, "optimizer", None),  # 11, 12
]
CPU_ALLOCATED = [11_000, 11_200, 11_000, 11_000, 14_000, 14_500, 11_500, 11_500, 10_500, 10_500, 11_200, 10_500, 10_500]
# Active lags by one event at each free_requested (2, 6, 8, 11): the completion comes next.
CPU_ACTIVE = [11_000, 11_200, 11_200, 11_000, 14_000, 14_500, 14_500, 11_500, 11_500, 10_500, 11_200, 11_200, 10_500]
CPU_PEAK = 5
MODULES = [
    dict(module="model", parent=None, class_name="Net", depth=0, param_bytes=0, buffer_bytes=0, param_count=0),
    dict(module="l1", parent="model", class_name="Linear", depth=1, param_bytes=4096, buffer_bytes=0, param_count=1024),
    dict(module="l2", parent="model", class_name="Linear", depth=1, param_bytes=8192, buffer_bytes=0, param_count=2048),
]


def cpu_steps(step_us: int) -> list[dict]:
    return [
        dict(
            step=s,
            ts_us=2_000 + step_us * s,
            allocated_bytes=10_500,
            reserved_bytes=None,
            max_allocated_bytes=14_500,
            num_alloc_retries=None,
        )
        for s in range(3)
    ]


@pytest.fixture
def cpu(tmp_path) -> Trace:
    return load(
        write_trace(
            tmp_path,
            CPU_EVENTS,
            name="cpu",
            modules=MODULES,
            steps=cpu_steps(100),
            baseline_allocated_bytes=CPU_BASELINE,
            config={"ckpt": False, "tokens_per_step": 1000},
        )
    )


@pytest.fixture
def cpu_smaller(tmp_path) -> Trace:
    """The CPU run with l2 keeping 2,000 instead of 3,000 bytes, and 80 us steps instead of 100."""
    events = [(a, addr, 2000 if addr == 0x3000 else size, *rest) for a, addr, size, *rest in CPU_EVENTS]
    return load(
        write_trace(
            tmp_path / "b",
            events,
            name="smaller",
            modules=MODULES,
            steps=cpu_steps(80),
            baseline_allocated_bytes=CPU_BASELINE,
            config={"ckpt": True},
        )
    )


# -- the CUDA run -----------------------------------------------------------------------
# Segments of the small pool are 2 MiB and its blocks 512-byte multiples, as torch makes them,
# so that the writer's block replay hands every block back at its requested size.
SEG = 2 << 20
S1, S2, S3 = 0x1000000, 0x1000000 + SEG, 0x1000000 + 2 * SEG


def _block(seg, addr, size, state):
    return dict(
        snapshot="start",
        ts_us=990,
        event_index=0,
        segment_addr=seg,
        segment_bytes=SEG,
        stream=0,
        segment_type="small",
        is_expandable=False,
        block_addr=addr,
        block_bytes=size,
        requested_bytes=size,
        state=state,
    )


# S1: live 1024 | free 1024 | live 512 | free to the end.
# S2: 512 pending free (requested before capture, completed at event 3) | free to the end.
CUDA_SEGMENTS = [
    _block(S1, S1, 1024, "active_allocated"),
    _block(S1, S1 + 0x400, 1024, "inactive"),
    _block(S1, S1 + 0x800, 512, "active_allocated"),
    _block(S1, S1 + 0xA00, SEG - 0xA00, "inactive"),
    _block(S2, S2, 512, "active_pending_free"),
    _block(S2, S2 + 0x200, SEG - 0x200, "inactive"),
]
CUDA_BASELINE = 1536  # S1's two live blocks; active adds S2's pending 512
CUDA_EVENTS = [
    ("alloc", S1 + 0x400, 512, "forward", "m"),  # 0  into S1's middle gap
    ("segment_alloc", S3, SEG, "forward", "m"),  # 1
    ("alloc", S3, 4096, "forward", "m"),  # 2
    ("free_completed", S2, 512, "forward", "m"),  # 3  the block pending since before capture
    ("free_requested", S1 + 0x800, 512, "backward", "m"),  # 4  a baseline block's free ...
    ("alloc", S2, 1024, "backward", "m"),  # 5  the peak: 6,656 allocated, 7,168 active
    ("free_requested", S3, 4096, "backward", "m"),  # 6
    ("free_completed", S1 + 0x800, 512, "backward", "m"),  # 7  ... completes 3 events later
    ("alloc", S2 + 0x400, 1024, "backward", "m"),  # 8  the peak of active bytes: 7,680
    ("free_completed", S3, 4096, "backward", "m"),  # 9  3 events after its request
    ("segment_free", S3, SEG, "backward", "m"),  # 10
]
CUDA_ALLOCATED = [2048, 2048, 6144, 6144, 5632, 6656, 2560, 2560, 3584, 3584, 3584]
CUDA_ACTIVE = [2560, 2560, 6656, 6144, 6144, 7168, 7168, 6656, 7680, 3584, 3584]
CUDA_RESERVED = [2 * SEG] + [3 * SEG] * 9 + [2 * SEG]
CUDA_PEAK = 5


def cuda_step(i: int) -> int:
    return 0 if i < 5 else 1


@pytest.fixture
def cuda(tmp_path) -> Trace:
    role = dict(ts_us=995, event_index=0, step=0, addr=S1, size_bytes=1024, role="parameter", name="w")
    # The allocator's own max_allocated_bytes (fakes would replay frees at free_completed).
    run = write_trace(
        tmp_path,
        CUDA_EVENTS,
        name="cuda",
        segments=CUDA_SEGMENTS,
        roles=[role],
        step_of=cuda_step,
        backend="cuda",
        device="cuda:0",
        baseline_allocated_bytes=CUDA_BASELINE,
        max_allocated_bytes=6656,
        max_reserved_bytes=3 * SEG,
    )
    return load(run)


def cuda_run_with_steps(out_dir, steps: list[dict]) -> Path:
    """The CUDA run written with `steps` as its steps table (step ends at events 4 and 10), the
    counters in each dict as an allocator would have reported them; ts_us and the peak are filled in."""
    rows = [dict(ts_us=5_000 + s["step"], allocated_bytes=0, max_allocated_bytes=6656) | s for s in steps]
    return write_trace(
        out_dir,
        CUDA_EVENTS,
        name="cuda",
        segments=CUDA_SEGMENTS,
        step_of=cuda_step,
        steps=rows,
        backend="cuda",
        device="cuda:0",
        baseline_allocated_bytes=CUDA_BASELINE,
        max_allocated_bytes=6656,
    )
