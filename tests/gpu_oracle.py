"""An independent replay of a trace's events, used as the oracle in accuracy tests.

Deliberately plain (a Python loop over events, no shared code with profiler.analysis),
so that a bug in the analysis cannot agree with itself.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq


def load_events(run_dir: Path):
    ev = pq.read_table(Path(run_dir) / "events.parquet").to_pandas()
    meta = json.loads((Path(run_dir) / "meta.json").read_text())
    return ev, meta


def replay(ev, baseline: int, release: str = "free_requested") -> tuple[int, int]:
    """(peak allocated bytes, event index of the first time it is reached).

    The allocator's allocated_bytes drops in free(), which records free_requested;
    `release="free_completed"` gives the issue's formula, equal unless a block
    waits on another stream's events.
    """
    cur = peak = baseline
    at = -1
    for i, (a, s) in enumerate(zip(ev["action"].tolist(), ev["block_bytes"].tolist())):
        if a == "alloc":
            cur += s
        elif a == release:
            cur -= s
        if cur > peak:
            peak, at = cur, i
    return peak, at


def allocated_at_step_ends(ev, baseline: int) -> dict[int, int]:
    """Replayed allocated bytes after the last event of each step."""
    cur, out = baseline, {}
    for a, s, step in zip(ev["action"].tolist(), ev["block_bytes"].tolist(), ev["step"].tolist()):
        if a == "alloc":
            cur += s
        elif a == "free_requested":
            cur -= s
        out[step] = cur
    return out


def categories_alive_at(ev, seg, index: int) -> dict[str, int]:
    """Bytes per category of blocks alive just after event `index` (baseline blocks included)."""
    live: dict[int, tuple[int, str]] = {}
    if seg is not None and len(seg):
        start = seg[(seg["snapshot"] == "start") & (seg["state"] == "active_allocated")]
        for a, s, c in zip(start["block_addr"], start["block_bytes"], start["category"]):
            live[int(a)] = (int(s), str(c))
    rows = zip(
        ev["action"].tolist()[: index + 1],
        ev["addr"].tolist()[: index + 1],
        ev["block_bytes"].tolist()[: index + 1],
        ev["category"].astype(str).tolist()[: index + 1],
    )
    for a, addr, s, c in rows:
        if a == "alloc":
            live[addr] = (s, c)
        elif a == "free_requested":
            live.pop(addr, None)
    out: dict[str, int] = {}
    for s, c in live.values():
        out[c] = out.get(c, 0) + s
    return out
