"""Which steps run module hooks.

Module hooks cost Python work per module call, so a capture with `hooked_steps=(first,
every)` runs them only in some steps; finalize gives the other steps modules and phases
from a hooked step (profiler/trace/finalize/templates.py). The rule (`hooks`): a step
runs module hooks when

1. it is one of `hooked_steps`: one of the first `first` steps, or a multiple of `every`;
2. or the last step whose events were drained ran unhooked, and ran a sequence of
   allocation sites that no earlier step ran (its block events' (action, stack id),
   sizes aside): the step after it is hooked, so that this kind of step has a
   template when it comes again. Each new sequence does this once, so steps that
   alternate between two kinds hook once, not every other step;
3. or the last step that ended set a new high-water mark of allocated bytes (its
   max_allocated_bytes at the boundary passed every earlier boundary's) by more than
   PEAK_GROWTH over the mark at which this rule last fired: the steps after a new peak
   are often alike, and each that is again new or again a clear peak hooks the one
   after it. A mark that creeps up by a little each step (a KV cache that grows by a
   token per decode step) hooks one step per PEAK_GROWTH of growth, not every step.

A step that already ran cannot be hooked after the fact: finalize labels it from a
template. On CPU a step's events are drained when it ends, so rule 2 applies to the
very next step; on CUDA they are drained on a timer, and rule 2 applies after that drain.

Work happens per drain and per step end, over whole columns, never per allocation.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from profiler.trace.finalize.markers import PREFIX as MARKER_PREFIX
from profiler.trace.finalize.markers import parse_marker

if TYPE_CHECKING:
    from profiler.capture.options import CaptureOptions

_CODES = {"alloc": 0, "free_requested": 1, "free_completed": 2}
PEAK_GROWTH = 0.05  # rule 3: how far a new high-water mark must pass the last one that hooked
OBSERVE_SLICE = 8192  # events judged at a time: 64 KiB int64 temporaries
_OBSERVED = ("action", "stack_id", "step", "tag")


class HookSampling:
    """The rule above, fed with drained event columns and step ends."""

    def __init__(self, options: CaptureOptions, steps_exact: bool) -> None:
        self.options = options
        self.hooked_steps = options.hooked_steps
        # True: drained events carry their own step (CPU drains before the index moves);
        # False: steps come from the position markers in the stream (CUDA).
        self._steps_exact = steps_exact
        self._open: dict[int, hashlib.blake2b] = {}  # step -> digest of its sites so far
        self._hooked: dict[int, bool] = {}  # ended steps not judged yet -> whether hooks ran
        self._step = 0  # step of the latest drained event
        self._complete_through = -1  # every event of steps up to here has been drained
        self._seen: set[bytes] = set()
        self._high_water: int | None = None
        self._peak_mark: int | None = None  # the high-water mark when rule 3 last fired (or the first)
        self._pending = False  # the next step is hooked by rule 2 or 3
        self._failed = False  # a bug of ours turns rules 2 and 3 off, never the user's job

    def hooks(self, step: int) -> bool:
        """Whether module hooks run in `step`, about to start (see the module doc)."""
        pending, self._pending = self._pending and not self._failed, False
        return self.options.modules and (self.options.hooks_step(step) or pending)

    def step_ended(self, step: int, hooked: bool, max_allocated_bytes: int | None) -> None:
        """`step` ended (with module hooks or not), with the allocator's high-water mark then."""
        if self.hooked_steps is None or self._failed:
            return
        try:
            self._step_ended(step, hooked, max_allocated_bytes)
        except Exception:  # noqa: BLE001 - see _failed
            self._failed = True

    def observe(self, cols: dict | None) -> None:
        """Events just drained (writer columns): add them to their steps' site sequences.

        A native backend's columns carry `sites`, its block events' sites worked out in the
        tracker (NativeColumns._columns): `keys`, in runs of one step that begin at `starts`,
        whose steps are `steps` (-1: the step the last drain ended in), and `last_step`, the
        step of the drain's last marker (-1: none)."""
        if self.hooked_steps is None or self._failed or not cols:
            return
        try:
            sites = cols.get("sites")
            if sites is not None:
                self._observe_native(sites, cols["step"])
                return
            n = len(cols["step"])
            if n <= OBSERVE_SLICE:  # a step's drain on CPU: no slices to copy
                self._observe(cols)
                return
            # In slices: whole-drain temporaries (a drain can hold 100,000 events) are fresh
            # memory each time, a page fault per 4 KiB; a slice's are reused.
            for start in range(0, n, OBSERVE_SLICE):
                self._observe({k: cols[k][start : start + OBSERVE_SLICE] for k in _OBSERVED if k in cols})
        except Exception:  # noqa: BLE001 - see _failed
            self._failed = True

    def _step_ended(self, step: int, hooked: bool, max_allocated_bytes: int | None) -> None:
        self._hooked[step] = hooked
        if max_allocated_bytes is not None:
            if self._high_water is not None and max_allocated_bytes > self._high_water:
                if self._peak_mark is None or max_allocated_bytes > self._peak_mark * (1 + PEAK_GROWTH):
                    self._pending = True
                    self._peak_mark = max_allocated_bytes
            elif self._high_water is None:
                self._peak_mark = max_allocated_bytes
            self._high_water = max(max_allocated_bytes, self._high_water or 0)
        if self._steps_exact:
            self._complete(step)

    def _observe(self, cols: dict) -> None:
        action_words, action_index = _distinct(cols["action"])
        n = len(action_index)
        stacks = cols.get("stack_id")
        stack = np.full(n, -1, np.int64) if stacks is None else _ints(stacks)
        # -1: not a block event
        code = np.array([_CODES.get(w, -1) for w in action_words] + [-1], np.int8)[action_index]
        if self._steps_exact:
            step = np.asarray(cols["step"], dtype=np.int64)
        else:
            step, is_marker = self._marker_steps(cols["tag"], n)
            code[is_marker] = -1
        self._add_sites(step, stack, code)

    def _observe_native(self, sites: dict, step_column) -> None:
        keys, bounds = sites["keys"], sites["starts"].tolist() + [len(sites["keys"])]
        if self._steps_exact:  # a drain of one step, which every event carries
            steps = [int(step_column[0])] * (len(bounds) - 1)
        else:
            steps = [self._step if s < 0 else s for s in sites["steps"].tolist()]
            if sites["last_step"] >= 0:
                self._step = int(sites["last_step"])
        for step, start, end in zip(steps, bounds, bounds[1:]):
            self._digest(step).update(keys[start:end].tobytes())
        if not self._steps_exact:
            self._complete(self._step - 1)

    def _add_sites(self, step: np.ndarray, stack: np.ndarray, code: np.ndarray) -> None:
        """Add each block event's site ((stack + 1) * 3 + code; code -1: not one) to its step's digest."""
        block = code >= 0
        # int32 keys: half the bytes to hash of int64 ones (stack ids stay far below 2**31 / 3).
        keys = (stack[block].astype(np.int32) + 1) * 3 + code[block].astype(np.int32)
        step = step[block]
        cuts = np.flatnonzero(np.diff(step)) + 1
        parts: Iterable[tuple[int, np.ndarray]]
        if not len(step):
            parts = []
        elif not len(cuts):  # most slices hold one step: no split (np.split and np.r_ cost ~15 us a call)
            parts = [(int(step[0]), keys)]
        else:
            parts = zip(step[np.concatenate(([0], cuts))].tolist(), np.split(keys, cuts))
        for part_step, part in parts:
            self._digest(part_step).update(part.tobytes())
        if not self._steps_exact:
            self._complete(self._step - 1)

    def _digest(self, step: int) -> hashlib.blake2b:
        digest = self._open.get(step)
        if digest is None:
            digest = self._open[step] = hashlib.blake2b(digest_size=16)
        return digest

    def _marker_steps(self, tags, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(step of each event, whether it is a marker's): events belong to the last marker before them."""
        words, index = _distinct(tags)
        marked = np.array([parsed[1] if parsed is not None else -1 for parsed in map(parse_marker, words)] + [-1])
        is_marker = np.array([isinstance(w, str) and w.startswith(MARKER_PREFIX) for w in words] + [False])[index]
        marked = marked[index]
        return self._forward_fill(np.where(is_marker, marked, -1)), is_marker

    def _forward_fill(self, marked: np.ndarray) -> np.ndarray:
        """Each event's step: that of the last marker (marked >= 0) before it, or of the drain before."""
        # Each marker of a step sets the step from its event on: forward-fill, in O(n).
        at = np.flatnonzero(marked >= 0)
        values = np.concatenate(([self._step], marked[at])).astype(np.int64)
        starts = np.zeros(len(marked), np.int64)
        starts[at] = 1
        step = values[np.cumsum(starts)]
        self._step = int(values[-1])
        return step

    def _complete(self, through: int) -> None:
        """Judge every step up to `through`: an unhooked one with sites not seen before hooks the next step."""
        if through <= self._complete_through:
            return
        self._complete_through = through
        for s in [s for s in self._open if s <= through]:
            digest = self._open.pop(s).digest()
            if digest not in self._seen:
                self._seen.add(digest)
                self._pending |= not self._hooked.get(s, True)
        for s in [s for s in self._hooked if s <= through]:
            del self._hooked[s]


def _distinct(values) -> tuple[list, np.ndarray]:
    """(distinct values, each element's index into them) of a column: an Arrow array
    (dictionary-encoded or not) or a sequence. A null's index is len(distinct values).
    Arrow columns are never walked per element in Python (a drain holds tens of thousands)."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if isinstance(values, pa.Array):
        if not pa.types.is_dictionary(values.type):
            values = values.dictionary_encode()
        words = values.dictionary.to_pylist()
        index = pc.fill_null(values.indices, len(words)).to_numpy(zero_copy_only=False).astype(np.int64)
        return words, index
    seen: dict = {}
    index = np.fromiter((seen.setdefault(v, len(seen)) for v in values), np.int64, len(values))
    words = list(seen)
    if None in seen:  # nulls take the index past the last word, as for Arrow columns
        null_at = seen[None]
        words.pop(null_at)
        index = np.where(index == null_at, len(words), index - (index > null_at))
    return words, index


def _ints(values) -> np.ndarray:
    """int64 array of ids, -1 for None."""
    if isinstance(values, (pa.Array, pa.ChunkedArray)):
        return pc.fill_null(values, -1).to_numpy(zero_copy_only=False).astype(np.int64)
    as_float = np.array(values, dtype=np.float64)  # through float: None becomes NaN in C
    return np.where(np.isnan(as_float), -1, as_float).astype(np.int64)
