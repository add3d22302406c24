"""Modules and phases for steps captured without module hooks, from hooked steps.

Module hooks cost Python work per module per step, so the session hooks only some
steps (profiler/capture/sampling.py says which). Each other step borrows its labels
(module, phase, category hint) from a hooked step, its *template*, event by event.
Only block events (alloc, free_requested, free_completed) are paired, never the
capture's position markers. The rule, first that applies:

1. identical: a hooked step with the same sequence of (action, requested bytes);
   the i-th event of one is the i-th of the other.
2. same sites: a hooked step with the same sequence of (action, stack id), sizes
   aside (a longer batch runs the same code on bigger tensors); paired by position.
3. aligned: the hooked step sharing the most (action, stack id) keys with it. The
   common head and tail of the two key sequences pair by position; between them,
   difflib.SequenceMatcher's equal stretches pair as they are, and inside a stretch
   that differs on both sides the k-th event with a key pairs with the k-th event
   with that key there. Keys that make up over 1% of a long step (events without a
   stack: backward on CUDA, where stacks are paused, frees on CPU, every event of a
   capture without stacks) start no stretch (SequenceMatcher's autojunk) but extend
   one, so they pair by order between events that have a stack. A step counts as
   aligned when at least half its allocations pair. Against fully hooked runs with
   events deleted, inserted and swapped, this gave more allocations their right
   module than pairing by key occurrence alone, where one missing event shifts
   every later event with its key.
4. none: the step keeps what it had (backward and optimizer phases, no modules).

A paired event takes its template's module, its own category hint when it has one
(hints are stamped without module hooks) and else the template's, and its
template's phase, except where its own phase holds without module hooks (optimizer,
a user's phase, a marker). In a step that got a template, an event left unpaired
keeps such a phase too; otherwise it takes the phase of the event before it in the
step: without hooks, "backward" lingers into the next micro-batch's forward, and
a missing phase would cut a forward span in two.

Stack ids match across hooked and unhooked steps because both backends leave
vramscope's own frames out of recorded stacks.

numpy and difflib only: this runs at finalize time in the profiled process.
"""

from __future__ import annotations

import difflib
import hashlib
from dataclasses import dataclass, field

import numpy as np

_BLOCK_ACTIONS = ("alloc", "free_requested", "free_completed")
_MIN_PAIRED = 0.5  # the share of a step's allocations that must pair for it to count as aligned


@dataclass
class TemplateFill:
    """What filling did: counts for meta.json, and the steps whose labels came from templates."""

    identical: int = 0
    same_sites: int = 0
    aligned: int = 0
    unmatched: int = 0
    unpaired_events: int = 0
    filled_steps: set[int] = field(default_factory=set)

    def counts(self) -> dict:
        return {
            "steps_from_template": self.identical + self.same_sites + self.aligned,
            "steps_without_template": self.unmatched,
            "steps_aligned_to_template": self.same_sites + self.aligned,
            "events_without_template": self.unpaired_events,
        }


@dataclass
class _Step:
    """One step's paired events: indices into the event arrays, in stream order."""

    idx: np.ndarray
    keys: np.ndarray  # (stack id + 1) * 3 + action code, per event

    def sites_digest(self) -> bytes:
        return hashlib.blake2b(self.keys.tobytes(), digest_size=16).digest()


def fill_from_templates(
    *,
    step: np.ndarray,
    action: np.ndarray,
    size: np.ndarray,
    stack: np.ndarray,
    hooked_steps: set[int],
    module: np.ndarray,
    phase: np.ndarray,
    hint: np.ndarray,
    phase_kept: np.ndarray,
    skip: np.ndarray | None = None,
) -> TemplateFill:
    """Fill module/phase/hint codes (-1: none) in place for unhooked steps (see the module doc).

    `stack` is the stack id per event (-1: none); `phase_kept` marks events whose own
    phase holds without module hooks; `skip` marks events never paired nor relabelled (markers).
    """
    code = (action == "alloc") * 0 + (action == "free_requested") * 1 + (action == "free_completed") * 2
    skip = np.zeros(len(step), bool) if skip is None else skip
    paired = np.isin(action, _BLOCK_ACTIONS) & ~skip
    whole, steps = _by_step(step, paired, (stack.astype(np.int64) + 1) * 3 + code, skip)
    by_size: dict[bytes, np.ndarray] = {}
    by_sites: dict[bytes, _Step] = {}
    for s in sorted(hooked_steps & steps.keys()):
        t = steps[s]
        by_size.setdefault(_size_digest(code, size, t.idx), t.idx)
        by_sites.setdefault(t.sites_digest(), t)
    matcher = _Matcher(list(by_sites.values()))
    labels = (module, phase, hint)
    fill = TemplateFill()
    for s, u in steps.items():
        if s in hooked_steps or len(u.idx) == 0:
            continue
        same = by_size.get(_size_digest(code, size, u.idx))
        if same is not None:
            fill.identical += 1
            pairs = (u.idx, same)
        elif (site_twin := by_sites.get(u.sites_digest())) is not None:
            fill.same_sites += 1
            pairs = (u.idx, site_twin.idx)
        else:
            pairs = matcher.pairs(u)
            if not _enough(u, pairs[0]):
                fill.unmatched += 1
                continue
            fill.aligned += 1
        fill.unpaired_events += int(len(u.idx) - len(pairs[0]))
        fill.filled_steps.add(s)
        _copy(labels, phase_kept, pairs, whole[s])
    return fill


def _by_step(step: np.ndarray, paired: np.ndarray, keys: np.ndarray, skip: np.ndarray) -> tuple[dict, dict[int, _Step]]:
    """Per step: its event indices but the skipped ones, and its events to pair with their keys."""
    order = np.argsort(step, kind="stable")
    whole: dict[int, np.ndarray] = {}
    steps: dict[int, _Step] = {}
    for g in np.split(order, np.flatnonzero(np.diff(step[order])) + 1):
        if len(g):
            s = int(step[g[0]])
            whole[s] = g[~skip[g]]
            steps[s] = _Step(g[paired[g]], keys[g[paired[g]]])
    return whole, steps


def _enough(u: _Step, paired: np.ndarray) -> bool:
    """Whether at least _MIN_PAIRED of the step's allocations (of its events, if it has none) paired."""
    is_alloc = u.keys % 3 == 0
    if not is_alloc.any():
        return len(paired) >= _MIN_PAIRED * len(u.idx)
    return int(np.isin(u.idx[is_alloc], paired).sum()) >= _MIN_PAIRED * int(is_alloc.sum())


def _size_digest(code: np.ndarray, size: np.ndarray, idx: np.ndarray) -> bytes:
    h = hashlib.blake2b(code[idx].astype(np.int8).tobytes(), digest_size=16)
    h.update(size[idx].astype(np.int64).tobytes())
    return h.digest()


def _copy(labels: tuple, phase_kept: np.ndarray, pairs: tuple[np.ndarray, np.ndarray], step_idx: np.ndarray) -> None:
    """Copy the template's labels onto the paired events; unpaired events of the step take phases."""
    module, phase, hint = labels
    dst, src = pairs
    module[dst] = module[src]
    hint[dst] = np.where(hint[dst] >= 0, hint[dst], hint[src])
    take = ~phase_kept[dst]
    phase[dst[take]] = phase[src[take]]
    # Every other event of the step, in stream order: a kept phase stays, the rest
    # carries the phase of the event before it forward.
    is_paired = np.zeros(len(phase), dtype=bool)
    is_paired[dst] = True
    ordered = np.sort(step_idx)
    anchor = is_paired[ordered] | phase_kept[ordered]
    pos = np.where(anchor, np.arange(len(ordered)), -1)
    np.maximum.accumulate(pos, out=pos)
    has = pos >= 0
    phase[ordered[has]] = phase[ordered[pos[has]]]


class _Matcher:
    """Aligns a step with the template sharing the most keys; alignments of equal steps are reused."""

    def __init__(self, templates: list[_Step]) -> None:
        self.templates = templates
        self._done: dict[bytes, tuple[int, np.ndarray, np.ndarray]] = {}

    def pairs(self, u: _Step) -> tuple[np.ndarray, np.ndarray]:
        """(indices in u, indices in its template) of the events that pair."""
        if not self.templates:
            return np.array([], np.int64), np.array([], np.int64)
        digest = u.sites_digest()
        found = self._done.get(digest)
        if found is None:
            which = int(np.argmax([_shared(u.keys, t.keys) for t in self.templates]))
            found = (which, *align(u.keys, self.templates[which].keys))
            self._done[digest] = found
        which, iu, it = found
        return u.idx[iu], self.templates[which].idx[it]


def _shared(a: np.ndarray, b: np.ndarray) -> int:
    """How many keys the two sequences share, counted with multiplicity."""
    values, inverse = np.unique(np.concatenate([a, b]), return_inverse=True)
    ca = np.bincount(inverse[: len(a)], minlength=len(values))
    cb = np.bincount(inverse[len(a) :], minlength=len(values))
    return int(np.minimum(ca, cb).sum())


def align(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positions (ia, ib) pairing two key sequences, in the order of `a`.

    The common head and tail pair directly; between them difflib.SequenceMatcher finds
    equal stretches, and inside stretches that differ events pair by key occurrence.
    """
    n = min(len(a), len(b))
    head = int(np.argmax(a[:n] != b[:n])) if n and (a[:n] != b[:n]).any() else n
    rest = n - head
    back_a, back_b = a[len(a) - rest :][::-1], b[len(b) - rest :][::-1]
    differ = back_a != back_b
    tail = int(np.argmax(differ)) if differ.any() else rest
    ia = [np.arange(head)]
    ib = [np.arange(head)]
    mid_a, mid_b = a[head : len(a) - tail], b[head : len(b) - tail]
    if len(mid_a) and len(mid_b):
        ma, mb = _align_middle(mid_a, mid_b)
        ia.append(ma + head)
        ib.append(mb + head)
    ia.append(np.arange(len(a) - tail, len(a)))
    ib.append(np.arange(len(b) - tail, len(b)))
    return np.concatenate(ia).astype(np.int64), np.concatenate(ib).astype(np.int64)


def _align_middle(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pairs between two key sequences that differ from their first to their last position:
    SequenceMatcher's equal stretches, and by key occurrence inside stretches that differ."""
    matcher = difflib.SequenceMatcher(None, a.tolist(), b.tolist())
    ia: list[np.ndarray] = [np.array([], np.int64)]
    ib: list[np.ndarray] = [np.array([], np.int64)]
    for tag, a0, a1, b0, b1 in matcher.get_opcodes():
        if tag == "equal":
            ia.append(np.arange(a0, a1))
            ib.append(np.arange(b0, b1))
        elif tag == "replace":
            pa_, pb_ = by_occurrence(a[a0:a1], b[b0:b1])
            ia.append(pa_ + a0)
            ib.append(pb_ + b0)
    return np.concatenate(ia), np.concatenate(ib)


def by_occurrence(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (ia, ib): the k-th occurrence of a key in `a` with the k-th occurrence in `b`.

    Returned in the order of `a`; positions in `b` need not increase.
    """
    bits = max(len(a), len(b)).bit_length()  # room for any occurrence count
    ta = (a << bits) + _occurrence(a)
    tb = (b << bits) + _occurrence(b)
    _, ia, ib = np.intersect1d(ta, tb, assume_unique=True, return_indices=True)
    order = np.argsort(ia, kind="stable")
    return ia[order].astype(np.int64), ib[order].astype(np.int64)


def _occurrence(keys: np.ndarray) -> np.ndarray:
    """For each position, how many earlier positions hold the same key."""
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
    run_start = np.repeat(starts, np.diff(np.r_[starts, len(keys)]))
    rank = np.empty(len(keys), np.int64)
    rank[order] = np.arange(len(keys)) - run_start
    return rank


def phase_runs(
    step: np.ndarray, ts: np.ndarray, phase: np.ndarray, emit: np.ndarray, considered: np.ndarray, steps: set[int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(step, phase code, first ts, last ts) of each run of one phase over the `considered`
    events of `steps`, in stream order; only runs whose first event is in `emit`."""
    sel = np.flatnonzero(np.isin(step, sorted(steps)) & considered)
    s, p = step[sel], phase[sel]
    starts = np.flatnonzero(np.r_[True, (s[1:] != s[:-1]) | (p[1:] != p[:-1])])
    ends = np.r_[starts[1:], len(sel)] - 1
    keep = emit[sel[starts]]
    return s[starts][keep], p[starts][keep], ts[sel[starts]][keep], ts[sel[ends]][keep]
