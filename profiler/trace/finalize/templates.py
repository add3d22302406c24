"""Module attribution for steps captured without module hooks, from identical steps.

Module hooks cost Python work per module per step. Training steps repeat, so the
session hooks only some steps (the first few, then every Nth). A step captured
without hooks is matched, event by event, against a hooked step: if both have
the same sequence of (action, requested bytes) over their alloc and free events,
the i-th event of one is the same operation as the i-th event of the other, and
takes its module and phase. A step with no identical hooked step keeps what it
had (phases without modules); nothing is guessed.

numpy only: this runs at finalize time in the profiled process.
"""

from __future__ import annotations

import numpy as np

_BLOCK_ACTIONS = ("alloc", "free_requested", "free_completed")


def fill_from_templates(
    *,
    step: np.ndarray,
    action: np.ndarray,
    size: np.ndarray,
    hooked_steps: set[int],
    module: np.ndarray,
    phase: np.ndarray,
    hint: np.ndarray,
) -> dict:
    """Fill module/phase/hint in place for unhooked steps; returns counts for meta."""
    is_block = np.isin(action, _BLOCK_ACTIONS)
    order = np.argsort(step, kind="stable")
    steps_sorted = step[order]
    bounds = np.flatnonzero(np.diff(steps_sorted)) + 1
    groups = np.split(order, bounds)
    templates: dict[bytes, np.ndarray] = {}
    by_step: dict[int, np.ndarray] = {}
    for g in groups:
        if len(g) == 0:
            continue
        idx = g[is_block[g]]
        by_step[int(step[g[0]])] = idx
        if int(step[g[0]]) in hooked_steps:
            templates.setdefault(_signature(action, size, idx), idx)
    filled = unmatched = 0
    for s, idx in by_step.items():
        if s in hooked_steps or len(idx) == 0:
            continue
        template = templates.get(_signature(action, size, idx))
        if template is None:
            unmatched += 1
            continue
        module[idx] = module[template]
        phase[idx] = phase[template]
        hint[idx] = hint[template]
        filled += 1
    return {"steps_from_template": filled, "steps_without_template": unmatched}


def _signature(action: np.ndarray, size: np.ndarray, idx: np.ndarray) -> bytes:
    a = action[idx]
    codes = (a == "alloc") * 1 + (a == "free_requested") * 2 + (a == "free_completed") * 3
    return codes.astype(np.int8).tobytes() + size[idx].astype(np.int64).tobytes()
