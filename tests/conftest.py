"""Shared test setup: import paths for `from fakes import ...`, and the reader's sample runs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

_TESTS = Path(__file__).resolve().parent
for _path in (_TESTS, _TESTS.parent):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from analysis_runs import cpu, cuda  # noqa: E402, F401  (fixtures that the analysis tests share)
from fakes import base_meta, write_trace  # noqa: E402  (needs the path above)

from profiler.trace.tags import make_tag  # noqa: E402
from profiler.trace.writer import TraceWriter  # noqa: E402

# Several phases per flush, so that every prefix of a killed run has activations and temporaries.
SAMPLE_EVENTS = [
    ("alloc", 0x100, 1024, "forward", "blocks.0"),
    ("alloc", 0x200, 4096, "forward", "blocks.1"),
    ("alloc", 0x300, 512, "backward", "blocks.1", "gradient"),
    ("free_completed", 0x200, 4096, "backward", "blocks.1"),
    ("alloc", 0x400, 256, "optimizer", None),
    ("free_completed", 0x100, 1024, "optimizer", None),
]
SAMPLE_ROWS = {
    "roles": [dict(ts_us=1_005, event_index=1, step=0, addr=0x100, size_bytes=1024, role="parameter", name="w")],
    "modules": [
        dict(
            module="blocks.0",
            parent=None,
            class_name="Block",
            depth=0,
            param_bytes=1024,
            buffer_bytes=0,
            param_count=256,
        )
    ],
    "segments": [
        dict(
            snapshot="start",
            ts_us=999,
            event_index=0,
            segment_addr=0x0,
            segment_bytes=1 << 20,
            stream=0,
            segment_type="large",
            is_expandable=False,
            block_addr=0x50,
            block_bytes=64,
            requested_bytes=64,
            state="active_allocated",
        )
    ],
}
KILLED_FLUSHES = 3


def finished_trace(out: Path) -> Path:
    """A finalized run: two steps, a role, a module, a baseline block, all in Parquet."""
    return write_trace(
        out,
        SAMPLE_EVENTS,
        step_of=lambda i: i // 3,
        phases=[dict(step=0, phase="forward", ts_us_start=1_000, ts_us_end=1_015)],
        **SAMPLE_ROWS,
    )


def killed_trace(out: Path) -> Path:
    """Journals of KILLED_FLUSHES equal batches and no status: what kill -9 mid-capture leaves."""
    w = TraceWriter(out, "killed", base_meta())
    n = len(SAMPLE_EVENTS)
    for step in range(KILLED_FLUSHES):
        w.append(
            "events",
            {
                "ts_us": [1_000 * step + i for i in range(n)],
                "action": [e[0] for e in SAMPLE_EVENTS],
                "addr": [e[1] + step for e in SAMPLE_EVENTS],
                "size_bytes": [e[2] for e in SAMPLE_EVENTS],
                "stream": [0] * n,
                "step": [step] * n,
                "tag": [make_tag(*e[3:6]) for e in SAMPLE_EVENTS],
            },
        )
        w.append(
            "steps",
            {"step": [step], "ts_us": [1_000 * step + 999], "allocated_bytes": [0], "max_allocated_bytes": [5_000]},
        )
        if step == 0:
            for table, rows in SAMPLE_ROWS.items():
                w.append(table, {k: [r[k] for r in rows] for k in rows[0]})
        w.flush()
    return w.run_dir


@pytest.fixture
def finished_run(tmp_path) -> Path:
    return finished_trace(tmp_path / "traces")


@pytest.fixture
def killed_run(tmp_path) -> Path:
    return killed_trace(tmp_path / "traces")


@pytest.fixture(scope="session")
def sample_runs(tmp_path_factory) -> dict[str, Path]:
    """One finished and one killed run per session, for tests that only copy them."""
    root = tmp_path_factory.mktemp("sample-runs")
    return {"finished": finished_trace(root), "killed": killed_trace(root)}


@pytest.fixture
def one_thread():
    """Tiny matmuls on a busy 2-core machine: a second intra-op thread costs more than it gives."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
