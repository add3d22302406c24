"""Modules and phases for steps captured without module hooks, from hooked steps.

Module hooks cost Python work per module per step, so the session hooks only some
steps (profiler/capture/sampling.py says which). Each other step borrows its labels
(module, phase, category hint) from a hooked step, its *template*, event by event.
A wrong label is worse than none, so the rule is: an event inherits a label only when
it is paired with certainty; an event left unpaired never takes a neighbour's label.

Proposing pairs (only block events: alloc, free_requested, free_completed; never the
capture's position markers), first rule that applies:

1. identical: a hooked step with the same sequence of (action, stack id, requested
   bytes); the i-th event of one is the i-th of the other.
2. same sites: a hooked step with the same sequence of (action, stack id), sizes aside
   (a longer batch runs the same code on bigger tensors); paired by position.
3. aligned: the hooked step sharing the most (action, stack id) keys with it. The common
   head and tail of the two key sequences, and the equal stretches that
   difflib.SequenceMatcher finds between them, pair by position. Events in stretches that
   differ are not proposed: a position there says nothing. Nor are events next to such a
   gap where the keys repeat so that the gap could sit a few places on with as many pairs
   (`unambiguous`): a one-off among backward's stackless allocations, a layer skipped
   among layers run by one loop. Nor are events whose key occurs more often in one step
   than in the other, or that are not the k-th occurrence of their key in both: any
   occurrence could be the extra one. Nor are events whose surrounding keys (4 on each
   side) differ between the steps. Pairs that pass both over the whole steps, and pairs
   whose surrounding keys occur once in each step, anchor windows; a key that fails the
   count over the whole steps may still pair inside a window where it passes, so a
   one-off costs labels only between the anchors around it.
   The step counts as aligned when at least half its allocations end up paired.
4. none: the step keeps what it had (backward and optimizer phases, no modules).

Certainty (finalize/pairing.py): a proposed pair holds only when the two blocks'
lifetimes agree (freed inside their steps by frees that pair too, or both outliving
them) and their sizes are equal or the event has a recorded site (a stack). On CUDA,
backward allocations have no stack and share one key, and one-off allocations
(cuBLAS workspaces made on a handle's first matmul, buffers made lazily for a new
shape, caching-allocator segments) appear in some steps only: a one-off shifts the
positions of what follows it, and the lifetime check rejects the shifted pairs.

A held pair gives its event the template's module, its own category hint when it has
one (hints are stamped without module hooks) and else the template's, and the
template's phase, except where its own phase holds without module hooks (optimizer, a
user's phase, a marker). An event of an unhooked step that holds no pair takes, for each
label, the one value its allocation site (stack id) had in every hooked step, if it is an
allocation (a free's labels tell when it ran, not where its block was made),
and nothing where the site had several values, no stack, or never ran hooked. Its phase,
if still unknown, is the phase of the paired events around it when those before and
after it agree (phases are spans of time), else none. Such events are counted
(`events_without_template`), and the steps filled from templates are listed
(`template_steps`), so the report can say why bytes at the peak have no module.

numpy and difflib only: this runs at finalize time in the profiled process.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from profiler.trace.finalize.alignment import shared_keys, unambiguous
from profiler.trace.finalize.pairing import SiteLabels, block_links, certain

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
            "template_steps": sorted(self.filled_steps),
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
    addr: np.ndarray,
    hooked_steps: set[int],
    module: np.ndarray,
    phase: np.ndarray,
    hint: np.ndarray,
    phase_kept: np.ndarray,
    skip: np.ndarray | None = None,
) -> TemplateFill:
    """Fill module/phase/hint codes (-1: none) in place for unhooked steps (see the module doc).

    `stack` is the stack id per event (-1: none); `addr` the block address; `phase_kept`
    marks events whose own phase holds without module hooks; `skip` marks events never
    paired nor relabelled (markers).
    """
    code = (action == "alloc") * 0 + (action == "free_requested") * 1 + (action == "free_completed") * 2
    skip = np.zeros(len(step), bool) if skip is None else skip
    block = np.isin(action, _BLOCK_ACTIONS) & ~skip
    is_alloc = code == 0
    links = block_links(step, is_alloc, addr, block)
    stack = _frees_take_their_allocations_stack(stack.astype(np.int64), links[4])
    keys = (stack + 1) * 3 + code
    whole, steps = _by_step(step, block, keys, skip)
    hooked = sorted(hooked_steps & steps.keys())
    with_site = np.concatenate([steps[s].idx for s in hooked] + [np.array([], np.int64)])
    # A free's labels say when it ran, not where its block was made: sites are allocations'.
    sites = SiteLabels(keys, (module, phase, hint), with_site[(stack[with_site] >= 0) & is_alloc[with_site]])
    by_size: dict[bytes, np.ndarray] = {}
    by_sites: dict[bytes, _Step] = {}
    for s in hooked:
        t = steps[s]
        by_size.setdefault(_size_digest(t.keys, size, t.idx), t.idx)
        by_sites.setdefault(t.sites_digest(), t)
    matcher = _Matcher(list(by_sites.values()))
    labels = (module, phase, hint)
    fill = TemplateFill()
    for s, u in steps.items():
        if s in hooked_steps or len(u.idx) == 0:
            continue
        dst, src, rule = _proposed(u, size, by_size, by_sites, matcher)
        keep = certain(dst, src, is_alloc=is_alloc, size=size, stack=stack, links=links)
        dst, src = dst[keep], src[keep]
        if rule == "aligned" and not _enough(u, dst):
            fill.unmatched += 1
            _from_sites(labels, phase_kept, u.idx, keys, sites, phases=False)
            continue
        setattr(fill, rule, getattr(fill, rule) + 1)
        fill.unpaired_events += int(len(u.idx) - len(dst))
        fill.filled_steps.add(s)
        rest = _copy(labels, phase_kept, (dst, src), whole[s])
        rest = rest[block[rest]]
        site_phased = _from_sites(labels, phase_kept, rest, keys, sites)
        _bracket_phases(phase, phase_kept, whole[s], np.concatenate([dst, site_phased]))
    return fill


def _frees_take_their_allocations_stack(stack: np.ndarray, made_by_any: np.ndarray) -> np.ndarray:
    """A free without a stack (on CPU) gets its block's allocation stack, as CUDA records it:
    frees then have sites of their own rather than all sharing one key."""
    take = (stack < 0) & (made_by_any >= 0)
    if not take.any():
        return stack
    stack = stack.copy()
    stack[take] = stack[made_by_any[take]]
    return stack


def _proposed(u: _Step, size, by_size: dict, by_sites: dict, matcher: _Matcher):
    """(events of u, events of its template, the rule) proposed as pairs by the first rule that applies."""
    same = by_size.get(_size_digest(u.keys, size, u.idx))
    if same is not None:
        return u.idx, same, "identical"
    site_twin = by_sites.get(u.sites_digest())
    if site_twin is not None:
        return u.idx, site_twin.idx, "same_sites"
    return (*matcher.pairs(u), "aligned")


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


def _size_digest(keys: np.ndarray, size: np.ndarray, idx: np.ndarray) -> bytes:
    h = hashlib.blake2b(keys.astype(np.int64).tobytes(), digest_size=16)
    h.update(size[idx].astype(np.int64).tobytes())
    return h.digest()


def _copy(labels: tuple, phase_kept: np.ndarray, pairs: tuple[np.ndarray, np.ndarray], step_idx: np.ndarray):
    """Copy the template's labels onto the paired events; returns the step's other events."""
    module, phase, hint = labels
    dst, src = pairs
    module[dst] = module[src]
    hint[dst] = np.where(hint[dst] >= 0, hint[dst], hint[src])
    take = ~phase_kept[dst]
    phase[dst[take]] = phase[src[take]]
    return step_idx[~np.isin(step_idx, dst)]


def _bracket_phases(phase: np.ndarray, phase_kept: np.ndarray, step_idx: np.ndarray, known: np.ndarray) -> None:
    """Events of the step whose phase is neither `known` nor kept take the phase of the known
    events around them where the one before and the one after agree, and none elsewhere:
    phases are spans of time, so an event between two of one phase is in it."""
    ordered = np.sort(step_idx)
    n = len(ordered)
    anchor = np.isin(ordered, known) | phase_kept[ordered]
    pos = np.arange(n)
    before = np.maximum.accumulate(np.where(anchor, pos, -1))
    after = np.minimum.accumulate(np.where(anchor, pos, n)[::-1])[::-1]
    p_before = np.where(before >= 0, phase[ordered[np.maximum(before, 0)]], -1)
    p_after = np.where(after < n, phase[ordered[np.minimum(after, n - 1)]], -1)
    loose = ~anchor
    phase[ordered[loose]] = np.where(p_before[loose] == p_after[loose], p_before[loose], -1)


def _from_sites(
    labels: tuple, phase_kept: np.ndarray, events: np.ndarray, keys: np.ndarray, sites: SiteLabels, phases: bool = True
) -> np.ndarray:
    """Give events with no module (no hint, no kept phase) their site's one value; returns
    the events whose phase came from their site (none unless `phases`)."""
    module, phase, hint = labels
    k = keys[events]
    site_module, site_hint = sites.lookup(k, 0), sites.lookup(k, 2)
    module[events] = np.where(module[events] >= 0, module[events], site_module)
    hint[events] = np.where(hint[events] >= 0, hint[events], site_hint)
    if not phases:
        return np.array([], np.int64)
    site_phase = sites.lookup(k, 1)
    got = (site_phase >= 0) & ~phase_kept[events]
    phase[events[got]] = site_phase[got]
    return events[got]


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
            which = int(np.argmax([shared_keys(u.keys, t.keys) for t in self.templates]))
            found = (which, *unambiguous(u.keys, self.templates[which].keys))
            self._done[digest] = found
        which, iu, it = found
        return u.idx[iu], self.templates[which].idx[it]


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
