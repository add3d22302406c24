"""What-if: from runs of one setup at several batch sizes (or sequence lengths), the largest that fits.

Pure functions over run summaries (profiler.analysis.summary.run_summary's dicts):

- each category's bytes at the allocated peak are fitted as ``fixed + slope * x``
  (least squares; with two runs the line goes through both points), x being the
  batch size or the sequence length. The fits sum to the fit of the peak allocated
  bytes, since least squares is linear in y.
- the allocator's overhead (reserved over allocated: rounding, cached free blocks,
  fragmentation) is the largest reserved / allocated ratio among the measured runs;
  runs without a reserved figure (CPU captures) count as ratio 1.
- the budget is the device memory less a safety margin for what the allocator cannot
  see (the CUDA context, library workspaces): ``device_memory - margin``.
- the largest x that fits is the largest whole x with
  ``ratio * (fixed + slope * x) <= budget``.

The axis value of each run comes from meta's config (``config.batch_size`` or
``config.seq_len``, or the same key under ``config.toggles``), unless given explicitly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from profiler import units
from profiler.errors import UsageError

AXES = {"batch": "batch_size", "seq": "seq_len"}
# Config keys that follow from the axis, so that they may differ between runs of one setup.
_DERIVED = {"tokens_per_step"}
DEFAULT_MARGIN_BYTES = 1 << 30  # CUDA context + cuBLAS/cuDNN workspaces: outside the allocator's view
OVER = 1.10  # the "10% larger" check


class WhatIfError(UsageError):
    """Runs that cannot be fitted together, or a fit that predicts nothing."""


def parse_size(value) -> int:
    """Bytes from an int or a string such as "80GiB" (a WhatIfError, shown as one line, if not)."""
    try:
        return units.parse_size(value)
    except ValueError as e:
        raise WhatIfError(str(e)) from None


@dataclass(frozen=True)
class Point:
    """One measured run: its axis value and its bytes at the allocated peak."""

    run: str
    x: int
    categories: dict[str, int]
    allocated: int
    reserved: int | None
    device_total: int | None = None
    device: str | None = None
    config: dict = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        """reserved / allocated at the peak (1 where reserved is unknown, e.g. on CPU)."""
        if not self.reserved or not self.allocated:
            return 1.0
        return self.reserved / self.allocated


def axis_key(axis: str) -> str:
    try:
        return AXES[axis]
    except KeyError:
        raise WhatIfError(f"unknown axis {axis!r}; expected one of {', '.join(AXES)}") from None


def axis_value(config: dict, axis: str) -> int | None:
    """The run's batch size (or seq_len) from its config, top level or under "toggles"."""
    key = axis_key(axis)
    toggles = config.get("toggles")
    for where in (config, toggles if isinstance(toggles, dict) else {}):
        v = where.get(key)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
        if isinstance(v, str) and v.isdigit() and int(v) > 0:
            return int(v)
    return None


def _max_or_none(*values):
    vs = [int(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return max(vs) if vs else None


def point_from_summary(summary: dict, axis: str = "batch", x: int | None = None, meta: dict | None = None) -> Point:
    """A Point from a run summary; ``x`` overrides the axis value read from the config."""
    config = summary.get("config")
    if not isinstance(config, dict):
        config = {}
    name = str(summary.get("name") or summary.get("run_id") or "?")
    if x is None:
        x = axis_value(config, axis)
    if x is None:
        raise WhatIfError(
            f"run {name} does not record its {axis_key(axis)} (meta config); give the values with --values"
        )
    cats = {str(k): int(v) for k, v in (summary.get("categories_at_peak_bytes") or {}).items()}
    allocated = int(summary.get("peak_allocated_bytes") or sum(cats.values()))
    # The run's highest reserved figure: the replay's and the allocator's own.
    reserved = _max_or_none(summary.get("peak_reserved_bytes"), summary.get("allocator_max_reserved_bytes"))
    meta = meta or {}
    return Point(
        run=name,
        x=int(x),
        categories=cats,
        allocated=allocated,
        reserved=reserved,
        device_total=_max_or_none(meta.get("device_total_bytes")),
        device=summary.get("device") or meta.get("device"),
        config=config,
    )


def check_same_setup(points: list[Point], axis: str = "batch") -> None:
    """Raise WhatIfError unless the runs differ only in the axis value, and in at least two of them."""
    if len(points) < 2:
        raise WhatIfError(f"whatif needs two or more runs, got {len(points)}")
    key = axis_key(axis)
    ignore = {key, "toggles"} | _DERIVED

    def setup(p: Point) -> dict:
        cfg = {k: v for k, v in p.config.items() if k not in ignore}
        toggles = p.config.get("toggles")
        if isinstance(toggles, dict):
            cfg["toggles"] = {k: v for k, v in toggles.items() if k != key}
        return cfg

    first = setup(points[0])
    for p in points[1:]:
        other = setup(p)
        if other != first:
            keys = sorted(k for k in set(first) | set(other) if first.get(k) != other.get(k))
            diffs = ", ".join(f"{k}={first.get(k)!r} vs {other.get(k)!r}" for k in keys)
            raise WhatIfError(f"runs {points[0].run} and {p.run} are not the same setup apart from {key}: {diffs}")
        if p.device != points[0].device:
            raise WhatIfError(
                f"runs {points[0].run} and {p.run} ran on different devices: {points[0].device!r} vs {p.device!r}"
            )
    if len({p.x for p in points}) < 2:
        raise WhatIfError(f"the runs need at least two different {key} values, got {points[0].x} only")


def fit_line(xs, ys) -> tuple[float, float]:
    """Least-squares (fixed, slope) of ys = fixed + slope * xs; exact through two points."""
    n = len(xs)
    if n != len(ys) or n < 2:
        raise WhatIfError("a fit needs two or more points")
    mx = sum(xs) / n
    my = sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        raise WhatIfError("a fit needs at least two different x values")
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    return my - slope * mx, slope


@dataclass(frozen=True)
class Model:
    axis: str
    xs: tuple[int, ...]
    categories: dict[str, tuple[float, float]]  # category -> (fixed, slope)
    overhead_ratio: float  # reserved / allocated, the largest measured
    ratios: tuple[float, ...]

    @property
    def fixed(self) -> float:
        return sum(f for f, _ in self.categories.values())

    @property
    def slope(self) -> float:
        return sum(s for _, s in self.categories.values())

    def allocated(self, x: float) -> float:
        return self.fixed + self.slope * x

    def reserved(self, x: float) -> float:
        return self.overhead_ratio * self.allocated(x)

    def by_category(self, x: float) -> dict[str, float]:
        return {c: f + s * x for c, (f, s) in self.categories.items()}


def fit(points: list[Point], axis: str = "batch") -> Model:
    """Per category at the peak, bytes = fixed + slope * x; and the reserved overhead ratio."""
    xs = [p.x for p in points]
    names = sorted({c for p in points for c in p.categories})
    cats = {c: fit_line(xs, [p.categories.get(c, 0) for p in points]) for c in names}
    # Bytes at the peak that no category holds (should not happen: they sum exactly) go to "other".
    rest = [p.allocated - sum(p.categories.values()) for p in points]
    if any(rest):
        f, s = fit_line(xs, rest)
        of, os_ = cats.get("other", (0.0, 0.0))
        cats["other"] = (of + f, os_ + s)
    ratios = tuple(p.ratio for p in points)
    return Model(axis=axis, xs=tuple(xs), categories=cats, overhead_ratio=max(ratios), ratios=ratios)


def largest_fitting(model: Model, budget: int) -> int:
    """The largest whole x >= 0 with reserved(x) <= budget (WhatIfError when nothing fits or nothing grows)."""
    if model.slope <= 0:
        raise WhatIfError(
            f"the peak does not grow with {axis_key(model.axis)} in these runs "
            f"(slope {model.slope:.0f} B per unit): nothing to predict"
        )
    x = math.floor((budget / model.overhead_ratio - model.fixed) / model.slope)
    # Guard the float floor against a rounding step either way.
    while x >= 0 and model.reserved(x) > budget:
        x -= 1
    while model.reserved(x + 1) <= budget:
        x += 1
    if x < 1:
        raise WhatIfError(
            f"not even {axis_key(model.axis)}=1 fits in {budget:,} B (predicted reserved {model.reserved(1):,.0f} B)"
        )
    return x


def device_budget(points: list[Point], device_memory: int | None, margin: int) -> tuple[int, int, str]:
    """(device memory, budget, where the device memory came from)."""
    if device_memory is not None:
        total, source = int(device_memory), "--device-memory"
    else:
        totals = {p.device_total for p in points if p.device_total}
        if not totals:
            raise WhatIfError(
                "the runs do not record device_total_bytes (a CPU capture?): "
                "give --device-memory, e.g. --device-memory 80GiB"
            )
        total, source = min(totals), "meta device_total_bytes"
    budget = total - int(margin)
    if budget <= 0:
        raise WhatIfError(f"the safety margin {margin:,} B leaves no memory of {total:,} B")
    return total, budget, source


def whatif(
    points: list[Point], *, axis: str = "batch", device_memory: int | None = None, margin: int = DEFAULT_MARGIN_BYTES
) -> dict:
    """The whole answer, JSON-ready: the fit, the largest x that fits and the predictions."""
    check_same_setup(points, axis)
    points = sorted(points, key=lambda p: p.x)
    model = fit(points, axis)
    total, budget, source = device_budget(points, device_memory, margin)
    best = largest_fitting(model, budget)
    over = max(best + 1, math.ceil(best * OVER))

    def prediction(x: int) -> dict:
        return {
            axis_key(axis): x,
            "allocated_bytes": int(round(model.allocated(x))),
            "reserved_bytes": int(round(model.reserved(x))),
            "categories_bytes": {c: int(round(b)) for c, b in model.by_category(x).items()},
            "reserved_fraction_of_device": model.reserved(x) / total,
        }

    fitted_alloc = [model.allocated(p.x) for p in points]
    return {
        "axis": axis,
        "key": axis_key(axis),
        "runs": [
            {
                "run": p.run,
                axis_key(axis): p.x,
                "allocated_bytes": p.allocated,
                "reserved_bytes": p.reserved,
                "ratio": p.ratio,
                "fit_allocated_bytes": int(round(f)),
                "fit_error": (f - p.allocated) / p.allocated if p.allocated else None,
            }
            for p, f in zip(points, fitted_alloc)
        ],
        "categories": {c: {"fixed_bytes": f, "slope_bytes": s} for c, (f, s) in model.categories.items()},
        "fixed_bytes": model.fixed,
        "slope_bytes": model.slope,
        "overhead_ratio": model.overhead_ratio,
        "device_memory_bytes": total,
        "device_memory_source": source,
        "margin_bytes": int(margin),
        "budget_bytes": budget,
        "largest": best,
        "at_largest": prediction(best),
        "at_over": prediction(over),
        "over_factor": OVER,
    }
