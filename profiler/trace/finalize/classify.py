"""Offline categories: one vectorised pass over a finished event stream.

Classifying after the fact costs nothing in the profiled process and can use
the future: whether a forward allocation outlived its phase is only known
when it is freed. The rules, in order of precedence:

1. a category hint stamped at allocation time (the KV-cache context), or read from
   where the allocation was made (sites.py: transformers' cache update);
2. a registered role: the allocation that is live at `addr` at the role's
   `event_index` is a parameter (or buffer), gradient, optimizer state or KV cache;
2b. a weak hint: FSDP's collectives stamp what they allocate (all-gather,
   reduce-scatter, unsharded parameters), but a reduce-scatter output becomes
   the sharded gradient, which its gradient role must win over;
3. the phase it was made in: forward/recompute allocations that outlive the
   phase span are activations, the rest temporaries; backward and optimizer
   allocations are temporaries; allocations made outside any phase are other.

Only numpy here: this also runs in the profiled process at finalize time.
"""

from __future__ import annotations

import numpy as np

from profiler.trace.schema import ROLE_CATEGORIES, Category, Phase

# Highest precedence first, when several roles name one allocation.
_ROLE_PRECEDENCE = tuple(ROLE_CATEGORIES)
_ROLE_TO_CATEGORY = {role: category.value for role, category in ROLE_CATEGORIES.items()}
# Hints that registered roles override (rule 2b).
WEAK_HINTS = frozenset({Category.ALL_GATHER.value, Category.REDUCE_SCATTER.value, Category.UNSHARDED_PARAMETER.value})

CATEGORY_VALUES = [c.value for c in Category]
_CAT_CODE = {c: i for i, c in enumerate(CATEGORY_VALUES)}
NO_CATEGORY = -1


def pair_with_allocs(action_is_alloc: np.ndarray, member: np.ndarray, addr: np.ndarray) -> np.ndarray:
    """For each event in `member`, the index of the latest earlier alloc at its addr (-1 if none).

    Events are in stream order. An alloc is its own match.
    """
    n = len(addr)
    out = np.full(n, -1, dtype=np.int64)
    idx = np.flatnonzero(member | action_is_alloc)
    if len(idx) == 0:
        return out
    order = idx[np.lexsort((idx, addr[idx]))]
    pos = np.arange(len(order))
    is_alloc = action_is_alloc[order]
    last = np.maximum.accumulate(np.where(is_alloc, pos, -1))
    valid = last >= 0
    same_addr = np.zeros(len(order), dtype=bool)
    same_addr[valid] = addr[order[last[valid]]] == addr[order[valid]]
    ok = valid & same_addr
    out[order[ok]] = order[last[ok]]
    return out


def next_free(alloc_idx: np.ndarray, is_free: np.ndarray, n: int) -> np.ndarray:
    """For each alloc event, the index of the free that ends it (n if never freed)."""
    free_of = np.full(n, n, dtype=np.int64)
    frees = np.flatnonzero(is_free & (alloc_idx >= 0))
    # Several frees can point at one alloc (free_requested then free_completed):
    # the earliest index per alloc wins, so write them in reverse order.
    frees = frees[::-1]
    free_of[alloc_idx[frees]] = frees
    return free_of


def _role_targets(role_addr, role_pos, alloc_addr, alloc_index):
    """For each role, the alloc event live at (addr, position), or -1."""
    if len(role_addr) == 0 or len(alloc_addr) == 0:
        return np.full(len(role_addr), -1, dtype=np.int64)
    # Merge roles behind allocs at equal (addr, position) and carry the last alloc forward.
    addrs = np.concatenate([alloc_addr, role_addr])
    pos = np.concatenate([alloc_index, role_pos])
    kind = np.concatenate([np.zeros(len(alloc_addr), np.int8), np.ones(len(role_addr), np.int8)])
    order = np.lexsort((kind, pos, addrs))
    is_alloc = kind[order] == 0
    seq = np.arange(len(order))
    last = np.maximum.accumulate(np.where(is_alloc, seq, -1))
    result = np.full(len(order), -1, dtype=np.int64)
    ok = last >= 0
    ok[ok] = addrs[order[last[ok]]] == addrs[order[ok]]
    src = np.where(ok, order[np.where(ok, last, 0)], -1)  # index into concatenated arrays
    result[ok] = alloc_index[src[ok]]
    out = np.full(len(role_addr), -1, dtype=np.int64)
    is_role = ~is_alloc
    out[order[is_role] - len(alloc_addr)] = result[is_role]
    return out


def _role_codes(roles: list[str]) -> np.ndarray:
    rank = {r: i for i, r in enumerate(_ROLE_PRECEDENCE)}
    return np.array([rank.get(r, len(rank)) for r in roles], dtype=np.int64)


def classify_events(
    *,
    action: np.ndarray,  # str codes per event, object or fixed-width array of torch's words
    addr: np.ndarray,
    phase: np.ndarray,  # object array: phase string or None per event
    hint: np.ndarray,  # object array: category hint or None per event
    role_addr: np.ndarray,
    role_index: np.ndarray,
    role_name: list[str],
    baseline_addr: np.ndarray,  # blocks alive when capture began
) -> tuple[np.ndarray, np.ndarray]:
    """Category codes (indices into CATEGORY_VALUES, -1 for none) for events and baseline blocks."""
    n = len(action)
    is_alloc = action == "alloc"
    is_free = (action == "free_requested") | (action == "free_completed")
    alloc_of = pair_with_allocs(is_alloc, is_free, addr)
    free_of = next_free(alloc_of, is_free, n)

    codes = np.full(n, NO_CATEGORY, dtype=np.int64)
    alloc_idx = np.flatnonzero(is_alloc)
    if n:
        codes[alloc_idx] = _phase_categories(phase, alloc_idx, free_of)

    # Rule 2b, below the roles: weak hints.
    hints = hint[alloc_idx] if n else hint[:0]
    hinted = set(hints.tolist()) - {None}
    for value in hinted & WEAK_HINTS:
        codes[alloc_idx[hints == value]] = _CAT_CODE[value]

    baseline_codes = np.full(len(baseline_addr), _CAT_CODE[Category.OTHER.value], dtype=np.int64)
    if len(role_addr):
        _apply_roles(
            codes,
            baseline_codes,
            addr=addr,
            alloc_idx=alloc_idx,
            touched=is_alloc | is_free,
            role_addr=role_addr,
            role_index=role_index,
            role_name=role_name,
            baseline_addr=baseline_addr,
        )

    # Rule 1: explicit hints win.
    for value in hinted - WEAK_HINTS:
        if value in _CAT_CODE:
            codes[alloc_idx[hints == value]] = _CAT_CODE[value]

    _inherit_on_free(codes, addr, np.flatnonzero(is_free), alloc_of, baseline_addr, baseline_codes)
    return codes, baseline_codes


def _phase_categories(phase: np.ndarray, alloc_idx: np.ndarray, free_of: np.ndarray) -> np.ndarray:
    """Rule 3: the category code of each alloc from its phase and whether it outlives the phase span."""
    n = len(phase)
    # Index of the first event of the next phase span (n for the last span).
    change = np.append(np.flatnonzero(phase[1:] != phase[:-1]) + 1, n)
    span_end = change[np.searchsorted(change, alloc_idx, side="right")]
    p = phase[alloc_idx]
    fwd = (p == Phase.FORWARD.value) | (p == Phase.RECOMPUTE.value)
    outlives = free_of[alloc_idx] >= span_end
    cat = np.full(len(alloc_idx), _CAT_CODE[Category.OTHER.value])
    cat[fwd & outlives] = _CAT_CODE[Category.ACTIVATION.value]
    cat[fwd & ~outlives] = _CAT_CODE[Category.TEMPORARY.value]
    builtin_other = (p == Phase.BACKWARD.value) | (p == Phase.OPTIMIZER.value)
    cat[builtin_other] = _CAT_CODE[Category.TEMPORARY.value]
    user = (p != None) & ~fwd & ~builtin_other  # noqa: E711 (object array)
    cat[user & ~outlives] = _CAT_CODE[Category.TEMPORARY.value]
    return cat


def _apply_roles(
    codes: np.ndarray,
    baseline_codes: np.ndarray,
    *,
    addr,
    alloc_idx,
    touched,
    role_addr,
    role_index,
    role_name,
    baseline_addr,
) -> None:
    """Rule 2: each role's category on the alloc it names, or on the baseline block it names.

    Applied lowest precedence first, so that higher ones overwrite.
    """
    targets = _role_targets(role_addr, role_index, addr[alloc_idx], alloc_idx)
    live = targets >= 0
    # A role pointing at no captured alloc refers to a block that pre-dates capture,
    # unless that address was freed or re-allocated before the role was registered.
    first_event_at = {}
    events = np.flatnonzero(touched)
    for a, i in zip(addr[events][::-1].tolist(), events[::-1].tolist()):
        first_event_at[a] = i
    base_pos = {a: j for j, a in enumerate(baseline_addr.tolist())}
    prec = _role_codes(role_name)
    for r in np.argsort(-prec, kind="stable"):
        cat_code = _CAT_CODE.get(_ROLE_TO_CATEGORY.get(role_name[r], ""), None)
        if cat_code is None:
            continue
        if live[r]:
            codes[targets[r]] = cat_code
            continue
        a = int(role_addr[r])
        j = base_pos.get(a)
        if j is not None and first_event_at.get(a, 1 << 62) >= role_index[r]:
            baseline_codes[j] = cat_code


def _inherit_on_free(
    codes: np.ndarray,
    addr: np.ndarray,
    freed: np.ndarray,
    alloc_of: np.ndarray,
    baseline_addr: np.ndarray,
    baseline_codes: np.ndarray,
) -> None:
    """Frees take their alloc's category, or that of the baseline block they release (else other)."""
    has_alloc = alloc_of[freed] >= 0
    codes[freed[has_alloc]] = codes[alloc_of[freed[has_alloc]]]
    orphan = freed[~has_alloc]
    if len(orphan) and len(baseline_addr):
        lookup = {a: c for a, c in zip(baseline_addr.tolist(), baseline_codes.tolist())}
        codes[orphan] = [lookup.get(a, _CAT_CODE[Category.OTHER.value]) for a in addr[orphan].tolist()]
    elif len(orphan):
        codes[orphan] = _CAT_CODE[Category.OTHER.value]
