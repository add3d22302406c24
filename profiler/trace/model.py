"""The in-memory model of one run, as the reader returns it and analysis consumes it.

Each table is a pandas DataFrame with the columns of `profiler.trace.schema.TABLES`;
dictionary columns arrive as pandas Categoricals (module, phase, category, ...).
Events are in stream order (the allocator's own order), which analysis relies on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd


@dataclass
class Trace:
    path: Path
    meta: dict
    events: pd.DataFrame
    steps: pd.DataFrame
    phases: pd.DataFrame
    modules: pd.DataFrame
    roles: pd.DataFrame
    segments: pd.DataFrame
    kv: pd.DataFrame
    frames: pd.DataFrame
    stacks: pd.DataFrame
    # Tables read from journals rather than Parquet: the run is live or was killed.
    from_journal: tuple[str, ...] = field(default_factory=tuple)

    @property
    def run_id(self) -> str:
        return self.meta.get("run_id", self.path.name)

    @property
    def name(self) -> str:
        return self.meta.get("name", self.run_id)

    @property
    def backend(self) -> str:
        return self.meta.get("backend", "?")

    @property
    def status(self) -> str:
        """complete, oom, error, terminated or capture_failed; 'running' while no final status is written."""
        return self.meta.get("status") or "running"

    @property
    def baseline_bytes(self) -> int:
        return int(self.meta.get("baseline_allocated_bytes") or 0)

    def baseline_blocks(self) -> pd.DataFrame:
        """Blocks allocated when capture began (empty on the CPU backend)."""
        seg = self.segments
        if seg.empty:
            return seg
        mask = (seg["snapshot"] == "start") & (seg["state"] == "active_allocated")
        return seg[mask]


# -- one rank of a multi-rank run, as profiler.trace.layout.read_ranks finds it ----------------

MISSING = "missing"
UNREADABLE = "unreadable"
RUNNING = "running"


@dataclass(frozen=True)
class RankRecord:
    """One rank as read from disk: its meta and summary, or the error that kept it from being read.

    exists: whether its rank=N partition is on disk (world_size may expect ranks that never wrote one).
    """

    rank: int
    path: Path
    meta: dict | None
    summary: dict | None
    error: str | None
    exists: bool = True

    @property
    def status(self) -> str:
        if self.summary is not None:
            return self.summary.get("status") or RUNNING
        return UNREADABLE if self.exists else MISSING
