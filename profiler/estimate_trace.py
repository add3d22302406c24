"""Any run against what its own tensors imply, with or without a model shape (`vramscope estimate --trace`).

What a step holds besides activations follows from the parameters alone, and the trace
registers every parameter, gradient and optimizer state by name (its roles table):
  parameter        the parameters' bytes (numel x element size);
  gradient         one gradient per parameter that had one, in the parameter's dtype;
  optimizer_state  per state, by its torch.optim name (profiler.estimate_terms.state_tensor_bytes):
                   AdamW's exp_avg and exp_avg_sq each as large as the parameter (2 x 4 B per
                   fp32 parameter), a 4 B step per parameter where the step is on the device.
Each is measured as its category's maximum over the run (categories.category_peaks): these
bytes are held, so the maximum is the steady state that the prediction describes. On CUDA
the measured bytes include the allocator's rounding (512 B blocks); on the CPU they are exact.

Activations need the model's shape. With one (a preset in the run's config, or given on the
command line), profiler.estimate.measured_vs_predicted compares every category at the peak
and each block's activations with the formulas; without one, the activations each module
kept for backward in the peak's step are listed, measured only (analysis.modules.module_table).
"""

from __future__ import annotations

import pandas as pd

from profiler.estimate_terms import state_tensor_bytes
from profiler.trace.schema import Category
from profiler.units import human_bytes

COLUMNS = ["level", "name", "measured_bytes", "predicted_bytes", "error_pct", "explanation"]
NAN = float("nan")  # error_pct where there is no prediction (predicted_bytes None)


def compare_with_trace(trace, est: dict | None = None, top: int = 20) -> pd.DataFrame:
    """COLUMNS, one row per comparison, by level: "held" (the parameters, gradients and optimizer
    state against the trace's tensors) and "state" (the optimizer state by name), always; with
    `est` (estimate(..., detail=True)), first "category" and "layer" (measured_vs_predicted);
    without it, "category" (at the peak, measured only) and "module" (at most `top`)."""
    from profiler.analysis.live import lifetimes
    from profiler.estimate import measured_vs_predicted

    lt = lifetimes(trace)
    held = _held_rows(trace, lt)
    if est is None:
        return _frame(held + _categories_at_peak(trace, lt) + _module_rows(trace, lt, top))
    formula = measured_vs_predicted(trace, est)
    return pd.concat([formula.astype(object), _frame(held)], ignore_index=True) if held else formula


def _frame(rows: list[tuple]) -> pd.DataFrame:
    # object columns: byte counts stay exact ints, a missing prediction stays None
    return pd.DataFrame(rows, columns=COLUMNS, dtype=object)


def _pct(measured, predicted) -> float:
    if predicted is None or not measured:
        return NAN
    return 100.0 * (predicted - measured) / measured


def _latest(roles: pd.DataFrame, role: str) -> pd.Series:
    """name -> bytes of the tensor last registered with `role` under that name."""
    rows = roles[roles["role"].astype(object) == role]
    return rows.groupby(rows["name"].astype(str), sort=False)["size_bytes"].last().astype("int64")


def _held_rows(trace, lt) -> list[tuple]:
    from profiler.analysis.categories import category_peaks

    roles = trace.roles
    params = _latest(roles, "parameter")
    if params.empty:
        return []  # no parameter registered: nothing to predict from
    peaks = category_peaks(trace, lt)
    own_max = dict(zip(peaks["category"], peaks["peak_bytes"].astype(int)))
    with_grad = [n.removesuffix(".grad") for n in _latest(roles, "gradient").index]
    grad = int(params.reindex(with_grad).fillna(0).sum())
    rows = [
        _row("held", "parameter", own_max, int(params.sum()), f"{len(params)} parameter tensors: numel x element size"),
        _row("held", "gradient", own_max, grad, f"{len(with_grad)} gradients, each its parameter's size"),
    ]
    states = _state_rows(_latest(roles, "optimizer_state"), params)
    if states:
        predicted = [r[3] for r in states]
        total = None if None in predicted else sum(predicted)
        names = ", ".join(r[1] for r in states)
        rows.append(_row("held", Category.OPTIMIZER_STATE.value, own_max, total, f"{names}, per parameter"))
    return rows + states


def _row(level: str, category: str, own_max: dict, predicted, why: str) -> tuple:
    measured = int(own_max.get(category, 0))
    note = f"{why}; measured: the category's maximum over the run"
    return (level, category, measured, predicted, _pct(measured, predicted), note)


def _state_rows(states: pd.Series, params: pd.Series) -> list[tuple]:
    """One row per optimizer state name: the bytes the trace registered against the parameters'."""
    per_state: dict[str, list[tuple[int, int | None]]] = {}  # name -> (registered, expected) per tensor
    for name, size in states.items():
        param, _, key = str(name).rpartition(".")
        param_bytes = params.get(param)
        expected = None if param_bytes is None else state_tensor_bytes(key, int(param_bytes))
        per_state.setdefault(key, []).append((int(size), expected))
    rows = []
    for key, tensors in per_state.items():
        measured = sum(size for size, _ in tensors)
        sizes = [e for _, e in tensors if e is not None]
        predicted = sum(sizes) if len(sizes) == len(tensors) else None
        why = f"{len(tensors)} tensors; " + (
            _STATE_WHY.get(key, "as large as its parameter") if predicted is not None else "not modelled"
        )
        rows.append(("state", key, measured, predicted, _pct(measured, predicted), why))
    return rows


_STATE_WHY = {"step": "a float32 scalar (4 B) per parameter"}


def _categories_at_peak(trace, lt) -> list[tuple]:
    """Every category allocated at the peak, and the peak, measured only: no shape, no formula."""
    from profiler.analysis.categories import category_at_peak
    from profiler.analysis.timeline import peak

    at_peak = category_at_peak(trace, lt)
    rows = [
        ("category", c, int(b), None, NAN, "at the peak; no model shape to predict it from")
        for c, b in zip(at_peak["category"], at_peak["total_bytes"])
        if b
    ]
    top = peak(trace, lt)
    measured = int(trace.meta.get("max_allocated_bytes") or top.allocated_bytes)
    where = f"step {top.step}, phase {top.phase or '(none)'}"
    return rows + [("category", "peak", measured, None, NAN, f"allocated at the peak ({where})")]


def _module_rows(trace, lt, top: int) -> list[tuple]:
    """The modules that kept the most activations for backward in the peak's step, measured."""
    from profiler.analysis.live import alive_at_peak
    from profiler.analysis.modules import module_table
    from profiler.analysis.timeline import peak

    step = peak(trace, lt).step
    table = module_table(trace, step=step, lt=lt)
    kept = table[table["retained_bytes"] > 0].sort_values("retained_bytes", ascending=False, kind="stable")
    live = alive_at_peak(trace, lt)
    act = live[live["category"].astype(object) == Category.ACTIVATION.value]
    alive = act.groupby(act["module"].astype(object))["size_bytes"].sum()
    in_step = "in every step" if step is None else f"in step {step}"
    return [
        (
            "module",
            m,
            int(b),
            None,
            NAN,
            f"kept for backward at the end of its forward {in_step}; "
            f"{human_bytes(int(alive.get(m, 0)))} of its activations alive at the peak",
        )
        for m, b in zip(kept["module"].head(top), kept["retained_bytes"].head(top))
    ]
