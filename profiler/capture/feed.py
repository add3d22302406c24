"""What a capture gathered, on its way to the writer.

The backend's events, the stacks they refer to, and the small tables (steps,
phases, modules, roles, kv) reach the journals together at each full drain (the
timer's, and a CPU step's), so the journals on disk always agree with one another.
A paced drain in between moves events alone to the writer, which holds them until
the next full drain flushes.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from profiler.capture.backend import Backend
    from profiler.trace.writer import TraceWriter


class DrainPacing:
    """Which step ends drain, so that no drain makes its step much longer than the others.

    A drain costs a fixed part (a few dozen calls into numpy, pyarrow and the writer: about
    a millisecond on the CPU machine, measured in a decode loop) and a part per event (tens
    of nanoseconds), all of it on the thread that ends the step. Drained only on the timer,
    a decode loop of 3 ms tokens puts 0.5 s of events (some 100,000) into one token: that
    token takes 7x the others. So a step end also drains once the steps since the last drain
    would cost SHARE of a step to drain: drain seconds are fitted as fixed + per_step x steps
    over the last SAMPLES drains (median slopes, which one slow drain does not move: _fit),
    and set against the usual step time (steps that drained left out). Until sizes _APART
    apart have given a fit, the cost is read as all per step, and each drain, while the last
    kept within SHARE, covers _APART times the largest before it at least: drains of one size
    never tell the parts apart. Where the fixed part
    alone is near SHARE of a step or more, a drain waits until its steps cost FLOOR of a step:
    it then costs the fixed part and little more (waiting until they cost as much as the
    fixed part made tokens of 2x on a slow H200 host). A drain covers at most twice the
    steps of the largest drain measured, so that a fit is never trusted far past what it saw.
    Training steps, which make few events for their length, are still drained by the timer
    alone. A paced drain waits at least MIN_GAP_S, and DUTY times as long as the last drain
    took, after it: a drain that costs the same however few events it takes (torch's history
    snapshots every live block) would otherwise be paced into every step.

    The first step end always drains. Its events hold most of the stacks the capture will
    ever see, and naming new stacks is the dearest part of a drain (a compiled model's
    first timer drain took 2.4x a step); the first step already pays the capture's start.
    That drain teaches nothing about later ones, nor sets the wait before the next. The
    PROBE_STEPS-th step end after it drains too, MIN_GAP_S after it at least: a small drain
    that measures what one costs, before the timer's first drain takes half a second of a
    decode loop's events (4-5x a token, seen on the CPU).
    """

    SHARE = 0.5
    FLOOR = 0.1
    PROBE_STEPS = 2
    MIN_GAP_S = 0.02
    DUTY = 10
    SAMPLES = 8
    _WEIGHT = 0.2  # of the newest measurement, in the running mean of the step time

    def __init__(self, clock=time.perf_counter) -> None:
        self._clock = clock
        self.steps = 0  # step ends since the last drain
        self._step_s: float | None = None  # running mean of a step without a drain
        self._samples: list[tuple[int, float]] = []  # (steps covered, seconds) of the last drains
        self._fixed_s = 0.0  # the fit: a drain's fixed seconds
        self._per_step_s: float | None = None  # and its seconds per step covered (None: no drain measured)
        self._fitted = False  # whether samples of sizes apart have told the two parts apart
        self._last_end: float | None = None
        self._last_drain = clock()
        self._last_drain_s = 0.0
        self._cap = 0  # steps a drain covers at most: twice the largest sampled
        self._drained_in_step = False
        self._ends = 0  # step ends in all

    def step_ended(self) -> bool:
        """A step ended; returns due(), read at the same clock."""
        now = self._clock()
        if self._last_end is not None and not self._drained_in_step:
            self._step_s = _running_mean(self._step_s, now - self._last_end, self._WEIGHT)
        self._last_end, self._drained_in_step = now, False
        self.steps += 1
        self._ends += 1
        return self._due(now)

    def drained(self, seconds: float) -> None:
        """A drain took `seconds`; it covered the steps that ended since the last one."""
        first = self._ends <= 1
        if self.steps and not first:
            self._samples = [*self._samples[-(self.SAMPLES - 1) :], (self.steps, seconds)]
            self._cap = 2 * max(k for k, _ in self._samples)
            fit = _fit(self._samples)
            if fit is not None:
                self._fixed_s, self._per_step_s = fit
                self._fitted = True
            elif self._per_step_s is None:  # one size so far: all of it per step, which drains soonest
                self._fixed_s, self._per_step_s = 0.0, sum(s / k for k, s in self._samples) / len(self._samples)
        self.steps = 0
        self._drained_in_step = True
        self._last_drain, self._last_drain_s = self._clock(), 0.0 if first else seconds

    def due(self) -> bool:
        """Whether the steps not drained yet would cost SHARE of a step to drain."""
        return self._due(self._clock())

    def _due(self, now: float) -> bool:
        if self._ends == 1 and self.steps == 1:
            return True
        if now - self._last_drain < max(self.MIN_GAP_S, self.DUTY * self._last_drain_s):
            return False
        if self._per_step_s is None:  # the probe
            return self._ends > 1 and self.steps >= self.PROBE_STEPS
        if self._step_s is None:
            return False
        if self.steps >= self._cap:
            return True
        if not self._fitted and self._samples[-1][1] <= self.SHARE * self._step_s:
            # Read as all per step, drains whose fixed part takes most of SHARE would stay at one
            # size, and samples of one size never tell the parts apart. While the last drain kept
            # within SHARE, the next covers _APART times the largest at least: if its cost is all
            # per step after all, that is _APART x SHARE of a step.
            if self.steps < math.ceil(_APART * max(k for k, _ in self._samples)):
                return False
        # The steps' part of the drain: what SHARE of a step leaves beyond the fixed part, and
        # at least FLOOR of a step, where the fixed part alone takes most of SHARE.
        variable = max(self.SHARE * self._step_s - self._fixed_s, self.FLOOR * self._step_s)
        return self.steps * self._per_step_s >= variable


def _fit(samples: list[tuple[int, float]]) -> tuple[float, float] | None:
    """(fixed, per step) seconds of a drain, from (steps, seconds) samples, robustly: per step is
    the median of the slopes between samples whose sizes differ by half or more (Theil-Sen), at
    least zero, and fixed the median of what each sample leaves. One slow drain (a collection, a
    busy disk, the first drains' new stacks) moves neither; least squares followed such a drain
    to a slope below zero, read all the cost as per step, and drained every few steps
    (bench/README.md). Samples too alike in size to tell the parts apart (drains of a settled
    size, where a slope between 80 and 81 steps is noise) give None: the fit stays as it was."""
    slopes = sorted(
        (s2 - s1) / (k2 - k1)
        for i, (k1, s1) in enumerate(samples)
        for k2, s2 in samples[i + 1 :]
        if max(k1, k2) >= _APART * min(k1, k2)
    )
    if not slopes:
        return None
    per_step = max(_median(slopes), 0.0)
    return max(_median(sorted(s - per_step * k for k, s in samples)), 0.0), per_step


_APART = 1.5  # sizes of two samples whose slope _fit reads


def _median(ordered: list[float]) -> float:
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def _running_mean(mean: float | None, value: float, weight: float) -> float:
    return value if mean is None else mean + weight * (value - mean)


class TraceFeed:
    """Buffers one capture's small tables and drains its backend into its writer."""

    def __init__(self, backend: Backend, writer: TraceWriter) -> None:
        self.backend = backend
        self.writer = writer
        self.pacing = DrainPacing()
        self.events_since_boundary = 0  # events drained since the last step end
        self.last_full_drain = time.perf_counter()  # rows and journals too (due() counts from it)
        self._meta_at = -float("inf")  # perf_counter of the last live meta.json write
        self._rows: dict[str, list[dict]] = {}  # table -> rows, until the next drain
        self._role_cols: list[dict] = []

    def buffer(self, table: str, **row) -> None:
        self._rows.setdefault(table, []).append(row)

    def buffer_row(self, table: str, row: dict) -> None:
        """buffer() of a dict that is the caller's no more (the steps row, once a step)."""
        self._rows.setdefault(table, []).append(row)

    def buffer_roles(self, cols: dict | None) -> None:
        if cols:
            self._role_cols.append(cols)

    def due(self, interval_s: float) -> bool:
        """True once `interval_s` passed since the last full drain (rows too)."""
        return time.perf_counter() - self.last_full_drain > interval_s

    def meta_due(self, interval_s: float) -> bool:
        """Whether to rewrite the live meta.json now: at most once per `interval_s`. A rename
        costs milliseconds on some filesystems, and a running or killed run's steps are read
        from its journals, not from meta.json (the final one is written at the end)."""
        now = time.perf_counter()
        if now - self._meta_at < interval_s:
            return False
        self._meta_at = now
        return True

    def drain(self, step: int, with_segments: bool = False, events: bool = True, rows: bool = True) -> dict | None:
        """Move new events (labelled `step`; none if not `events`) and, if `rows`, the buffered
        rows and new stacks to the writer; returns the events' columns. A paced drain takes no
        rows: the few rows of its steps cost as much to convert as its events (three small
        tables, 130 us each on the CPU machine), so they wait for the timer's drain, which
        also flushes. Nothing reaches disk in between, so the journals agree at every flush."""
        failure = getattr(self.backend, "failure", None)
        if failure is not None:  # the backend stopped recording on an error of ours: so does the capture
            raise failure
        cols = self.backend.drain(step, with_segments) if events else None
        if cols:
            self.events_since_boundary += len(cols["ts_us"])
            self.writer.append("events", cols)
        if rows:
            self.last_full_drain = time.perf_counter()
            self.push_rows()
        return cols

    def push_rows(self) -> None:
        """Move new stacks and buffered rows (not events) to the writer."""
        frames, stacks = self.backend.interner.take_new()
        if frames:
            self.writer.append("frames", frames)
        if stacks:
            self.writer.append("stacks", stacks)
        for table, rows in self._rows.items():
            self.writer.append_rows(table, rows)
        self._rows = {}
        for cols in self._role_cols:
            self.writer.append("roles", cols)
        self._role_cols = []
