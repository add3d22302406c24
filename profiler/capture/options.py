"""Every option of a capture, in one place: `profiler.profile(...)` and `Profiler(...)` build it."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from numbers import Integral, Real

from profiler.capture.backend import BACKEND_NAMES, CAPTURE_PATHS
from profiler.errors import UsageError


class CaptureOptionError(UsageError, ValueError):
    """An option that cannot work; raised when the Profiler is made, not when it starts."""


@dataclass(frozen=True, kw_only=True, slots=True)
class CaptureOptions:
    out: str | os.PathLike = "traces"
    """Directory under which the run directory is made."""
    name: str | None = None
    """Labels the run (and its directory); None: "run"."""
    config: dict = field(default_factory=dict)
    """What the run toggled, shown in comparisons (meta.json's `config`)."""
    backend: str = "auto"
    """"cuda", "cpu", or "auto": CUDA when a device is available."""
    capture_path: str = "auto"
    """How events arrive: "native" (a tracker compiled on first use, fed by the CUDA caching
    allocator or by c10's CPU allocator), "python" (torch's memory history on CUDA, drained by
    snapshot; a dispatch mode over tensor storages on CPU), or "auto": native wherever it
    builds, else python; meta.json says which ran (`capture_path`) and why (`capture_path_error`)."""
    stacks: bool = True
    """Record the Python stack of each allocation."""
    modules: bool = True
    """Module hooks: False is cheaper, and allocations then carry phases but no module."""
    hooked_steps: tuple[int, int] | None = (3, 50)
    """(first, every): module hooks run in the first `first` steps, every `every`-th step,
    and the step after one that was new or set a new peak (profiler/capture/sampling.py);
    other steps borrow their modules and phases from a hooked step
    (profiler/trace/finalize/templates.py). None hooks every step."""
    max_entries: int = 1_000_000
    """Size of torch's history ring between two drains (capture_path "python"): entries past it
    are lost and counted in meta.json. The native tracker has no ring and keeps every entry."""
    drain_interval_s: float = 0.5
    """Longest time between drains while no step ends (inference loops may never step)."""
    run_id: str | None = None
    """The run directory's name; None: a fresh one (or, under torchrun, one all ranks share)."""
    subdir: str | None = None
    """A partition inside the run directory (e.g. "rank=0"); None: chosen from the launcher."""
    extra_meta: dict = field(default_factory=dict)
    """Run-level facts added to meta.json."""
    explicit_steps: bool = False
    """Steps end only at prof.step() (a framework's own step end), never at an optimizer step."""

    def __post_init__(self):
        # Own copies: a caller's dict changed later must not change a capture's meta.
        object.__setattr__(self, "config", _mapping("config", self.config))
        object.__setattr__(self, "extra_meta", _mapping("extra_meta", self.extra_meta))
        object.__setattr__(self, "name", self.name or "run")
        if self.backend not in BACKEND_NAMES:
            raise CaptureOptionError(f"unknown backend {self.backend!r}: expected auto, cuda or cpu")
        if self.capture_path not in CAPTURE_PATHS:
            raise CaptureOptionError(f"unknown capture_path {self.capture_path!r}: expected auto, native or python")
        if self.hooked_steps is not None:
            object.__setattr__(self, "hooked_steps", _first_every(self.hooked_steps))
        if not _is_int(self.max_entries) or self.max_entries <= 0:
            raise CaptureOptionError(f"max_entries must be a positive int, not {self.max_entries!r}")
        object.__setattr__(self, "max_entries", int(self.max_entries))
        if (
            not isinstance(self.drain_interval_s, Real)
            or isinstance(self.drain_interval_s, bool)
            or not self.drain_interval_s >= 0
        ):
            raise CaptureOptionError(
                f"drain_interval_s must be a number of seconds >= 0, not {self.drain_interval_s!r}"
            )

    def hooks_step(self, step: int) -> bool:
        """Whether module hooks run in step `step` (see hooked_steps)."""
        if self.hooked_steps is None:
            return True
        first, every = self.hooked_steps
        return step < first or (every != 0 and step % every == 0)

    def as_kwargs(self) -> dict:
        """The options as keyword arguments of Profiler and profile()."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def option_names() -> frozenset[str]:
    return frozenset(f.name for f in dataclasses.fields(CaptureOptions))


def _is_int(x) -> bool:
    return isinstance(x, Integral) and not isinstance(x, bool)


def _mapping(what: str, value) -> dict:
    try:
        return dict(value or {})
    except (TypeError, ValueError):
        raise CaptureOptionError(f"{what} must be a dict, not {value!r}") from None


def _first_every(value) -> tuple[int, int]:
    ok = isinstance(value, (tuple, list)) and len(value) == 2 and all(_is_int(v) and v >= 0 for v in value)
    if not ok:
        raise CaptureOptionError(f"hooked_steps must be None or (first, every), two ints >= 0, not {value!r}")
    return (int(value[0]), int(value[1]))
