"""Bytes alive at the peak that nothing attributes, and why.

An allocation is attributed when it carries a module, or a category that names what it
holds (a parameter, gradient, optimizer state, KV cache or FSDP buffer), or the optimizer
phase or a user's phase. The rest (activations, temporaries and "other" with no module)
are unattributed, for one of these reasons:

    modules_off     the capture ran without module hooks (modules=False)
    unhooked        made in a step that ran without module hooks, and no hooked step
                    matched those allocations (profiler/trace/finalize/templates.py)
    unpaired        made in a step filled from a hooked step, but no hooked allocation
                    pairs with them for certain (a one-off such as a workspace, or a site
                    that repeats or has no stack) and their site had no single module;
                    an allocation whose stack allocated only outside modules in hooked
                    steps counts as outside_module instead
    outside_module  made in a hooked step outside any module (the input batch, a loss
                    computed outside the model)
    before_capture  allocated before the capture began

Pure: a Trace in, a dict out.
"""

from __future__ import annotations

import numpy as np

from profiler.analysis.live import Lifetimes, alive_at_peak, lifetimes
from profiler.analysis.timeline import int_column
from profiler.trace.schema import Category, Phase

_NAMED = frozenset(c.value for c in Category) - {
    Category.ACTIVATION.value,
    Category.TEMPORARY.value,
    Category.OTHER.value,
}
_HOOK_PHASES = frozenset({Phase.FORWARD.value, Phase.BACKWARD.value, Phase.RECOMPUTE.value})
REASONS = ("unpaired", "unhooked", "modules_off", "outside_module", "before_capture")


def unattributed_at_peak(trace, lt: Lifetimes | None = None) -> dict:
    """Unattributed bytes at the peak: the total, and per reason its bytes and the steps that made them.

    {"allocated_bytes", "unattributed_bytes", "reasons": [{"reason", "bytes", "steps"}]},
    reasons in REASONS order, only those with bytes.
    """
    lt = lt or lifetimes(trace)
    live = alive_at_peak(trace, lt)
    total = int(live["size_bytes"].sum())
    phase = live["phase"].to_numpy(object)
    lost = (
        live["module"].isna().to_numpy()
        & ~live["category"].isin(_NAMED).to_numpy()
        & np.array([p is None or p in _HOOK_PHASES for p in phase], dtype=bool)
    )
    size = live["size_bytes"].to_numpy(np.int64)[lost]
    alloc = live["alloc_index"].to_numpy(np.int64)[lost]
    steps = int_column(trace.events, "step", fill=-1)
    step = np.where(alloc >= 0, steps[np.maximum(alloc, 0)] if len(steps) else -1, -1)
    reason = np.full(len(alloc), "outside_module", dtype=object)
    reason[_unhooked(trace, step)] = "modules_off" if _modules_off(trace) else "unhooked"
    filled = trace.meta.get("template_steps")
    if isinstance(filled, list) and filled:
        in_filled = np.isin(step, filled) & (reason == "unhooked")
        outside = _sites_always_outside(trace, alloc[in_filled])
        reason[np.flatnonzero(in_filled)[outside]] = "outside_module"
        reason[np.flatnonzero(in_filled)[~outside]] = "unpaired"
    reason[alloc < 0] = "before_capture"
    reasons = []
    for name in REASONS:
        mine = reason == name
        if mine.any():
            made_in = sorted(int(s) for s in np.unique(step[mine]) if s >= 0)
            reasons.append({"reason": name, "bytes": int(size[mine].sum()), "steps": made_in})
    return {"allocated_bytes": total, "unattributed_bytes": int(size.sum()), "reasons": reasons}


def _sites_always_outside(trace, alloc: np.ndarray) -> np.ndarray:
    """Per allocation (event index): whether its stack allocated in hooked steps, always
    outside any module (then a template step's copy is outside one too, not unpaired)."""
    ev = trace.events
    stack = int_column(ev, "stack_id", fill=-1)
    hooked = ~_unhooked(trace, int_column(ev, "step", fill=-1))
    allocs = (ev["action"].astype(str) == "alloc").to_numpy() & hooked & (stack >= 0)
    named = ev["module"].notna().to_numpy()
    seen = np.unique(stack[allocs])
    ever_named = np.unique(stack[allocs & named])
    mine = stack[alloc]
    return np.isin(mine, seen) & ~np.isin(mine, ever_named)


def _modules_off(trace) -> bool:
    capture = trace.meta.get("capture")
    return isinstance(capture, dict) and capture.get("modules") is False


def _unhooked(trace, step: np.ndarray) -> np.ndarray:
    """Whether each step ran without module hooks (the steps table's flag; unknown: hooked)."""
    steps = trace.steps
    if _modules_off(trace):
        return step >= 0
    if not len(steps) or "modules_hooked" not in steps.columns:
        return np.zeros(len(step), dtype=bool)
    flags = steps["modules_hooked"].astype(object)
    off = {int(s) for s, f in zip(steps["step"].tolist(), flags.tolist()) if isinstance(f, (bool, np.bool_)) and not f}
    return np.array([int(s) in off for s in step.tolist()], dtype=bool)
