"""Which events of an unhooked step pair with a hooked step's for certain, and what an
event left unpaired may still take from its allocation site.

finalize/templates.py proposes pairs (by position in steps with the same allocation
sites, or in the equal stretches of an alignment). A proposal is no proof: on CUDA a
one-off allocation (a cuBLAS workspace made on the first matmul of a handle, a buffer
made lazily for a new shape) can sit where a hooked step had another event, and events
without a stack (CUDA's backward) share one key, so one extra event would shift every
later pair. `certain` keeps a proposed pair only when the blocks' lifetimes agree:

- an allocation pairs when both blocks are freed inside their steps and the two frees
  were proposed as a pair too, or both are first freed the same number of steps later,
  or neither is ever freed (or the capture ended before the template's lifetime would);
  and when their sizes are equal, or the allocation has a recorded site (a stack: the
  same code, on tensors of another size), or its paired free vouches for it;
- a free pairs when the allocations of both blocks paired, or both blocks come from
  before their steps and the sizes are equal or the free has a recorded site.

`SiteLabels` holds, for each allocation site (action and stack id) seen in hooked steps,
the one module, phase and category hint it always had there (none where it had several).

numpy only: this runs at finalize time in the profiled process.
"""

from __future__ import annotations

import numpy as np

AMBIGUOUS = -2  # a site that had several values in hooked steps


def block_links(step: np.ndarray, is_alloc: np.ndarray, addr: np.ndarray, block: np.ndarray):
    """(freed_by, made_by, lifetime) per event: the first free of an allocation's block and
    the allocation of a free's block, each only when both are in one step (else -1); and for
    an allocation, how many steps after its own its block is first freed (-1: never).

    `block` marks the block events (alloc and frees, markers excluded).
    """
    n = len(step)
    freed_by = np.full(n, -1, np.int64)
    made_by = np.full(n, -1, np.int64)
    made_by_any = np.full(n, -1, np.int64)
    lifetime = np.full(n, -1, np.int64)
    idx = np.flatnonzero(block)
    if not len(idx):
        return freed_by, made_by, lifetime, lifetime, made_by_any
    steps_left = int(step.max()) - step  # a block still alive at the end may be freed after it
    order = idx[np.lexsort((idx, addr[idx]))]  # by address, then in stream order
    alloc = is_alloc[order]
    pos = np.arange(len(order))
    new_addr = np.r_[True, addr[order[1:]] != addr[order[:-1]]]
    group_start = np.maximum.accumulate(np.where(new_addr, pos, 0))
    last_alloc = np.maximum.accumulate(np.where(alloc, pos, -1))
    is_free = ~alloc & (last_alloc >= group_start)
    frees, allocs = order[is_free], order[last_alloc[is_free]]
    made_by_any[frees] = allocs
    same = step[frees] == step[allocs]
    made_by[frees[same]] = allocs[same]
    # An allocation's first free is the next event at its address.
    first = np.flatnonzero(alloc[:-1] & ~alloc[1:] & ~new_addr[1:])
    a, f = order[first], order[first + 1]
    lifetime[a] = step[f] - step[a]
    same = step[a] == step[f]
    freed_by[a[same]] = f[same]
    return freed_by, made_by, lifetime, steps_left, made_by_any


def certain(
    dst: np.ndarray,
    src: np.ndarray,
    *,
    is_alloc: np.ndarray,
    size: np.ndarray,
    stack: np.ndarray,
    links: tuple[np.ndarray, ...],
) -> np.ndarray:
    """Which proposed pairs (dst[i] in the unhooked step, src[i] in its template) hold (module doc)."""
    freed_by, made_by, steps_alive, steps_left = links[:4]
    proposed = _Partner(dst, src)
    fu, ft = freed_by[dst], freed_by[src]
    both = (fu >= 0) & (ft >= 0)
    # A block the capture ended on may be freed later, as its template's was.
    cut_short = (steps_alive[dst] < 0) & (steps_alive[src] > steps_left[dst])
    lifetime = ((steps_alive[dst] == steps_alive[src]) | cut_short) & (~both | (proposed.of(fu) == ft))
    sized = (size[dst] == size[src]) | (stack[dst] >= 0)
    ok_alloc = is_alloc[dst] & lifetime & (sized | both)
    paired = _Partner(dst[ok_alloc], src[ok_alloc])
    mu, mt = made_by[dst], made_by[src]
    made_u, made_t = mu >= 0, mt >= 0
    ok_free = (made_u & made_t & (paired.of(mu) == mt)) | (~made_u & ~made_t & sized)
    return np.where(is_alloc[dst], ok_alloc, ok_free)


class _Partner:
    """The partner of each event of a set of pairs; -1 for events in no pair."""

    def __init__(self, dst: np.ndarray, src: np.ndarray) -> None:
        order = np.argsort(dst, kind="stable")
        self.dst, self.src = dst[order], src[order]

    def of(self, events: np.ndarray) -> np.ndarray:
        if not len(self.dst):
            return np.full(len(events), -1, np.int64)
        at = np.minimum(np.searchsorted(self.dst, events), len(self.dst) - 1)
        return np.where(self.dst[at] == events, self.src[at], -1)


class SiteLabels:
    """The one value of each label (module, phase, hint) each site had in hooked steps."""

    def __init__(self, keys: np.ndarray, labels: tuple[np.ndarray, ...], hooked: np.ndarray) -> None:
        """`hooked`: indices of the hooked steps' block events that have a site (a stack)."""
        self.keys = np.unique(keys[hooked])
        if not len(hooked):
            self.values = [np.array([], np.int64) for _ in labels]
            return
        self.values = [self._one_value(keys[hooked], label[hooked]) for label in labels]

    def _one_value(self, keys: np.ndarray, values: np.ndarray) -> np.ndarray:
        """Per site in self.keys: its value, or AMBIGUOUS where it had several (none counts as one)."""
        pairs = np.unique(np.stack([keys, values.astype(np.int64)]), axis=1)
        site_of_pair = np.searchsorted(self.keys, pairs[0])
        count = np.bincount(site_of_pair, minlength=len(self.keys))
        out = np.full(len(self.keys), AMBIGUOUS, np.int64)
        single = count[site_of_pair] == 1
        out[site_of_pair[single]] = pairs[1][single]
        return out

    def lookup(self, keys: np.ndarray, which: int) -> np.ndarray:
        """Per key: its site's single value of label `which`, -1 where none or several, or an unseen site."""
        if not len(self.keys):
            return np.full(len(keys), -1, np.int64)
        at = np.minimum(np.searchsorted(self.keys, keys), len(self.keys) - 1)
        found = (self.keys[at] == keys) & (self.values[which][at] != AMBIGUOUS)
        return np.where(found, self.values[which][at], -1)
