"""Pairing the events of two steps by their keys (allocation site and size), with certainty.

align() pairs the longest stretches the two key sequences share; unambiguous() then drops
every pair another alignment as good could make differently, and pairs whose surroundings
disagree, so that a label is only ever copied between events that are certainly the same.
"""

from __future__ import annotations

import difflib

import numpy as np


def shared_keys(a: np.ndarray, b: np.ndarray) -> int:
    """How many keys the two sequences share, counted with multiplicity."""
    values, inverse = np.unique(np.concatenate([a, b]), return_inverse=True)
    ca = np.bincount(inverse[: len(a)], minlength=len(values))
    cb = np.bincount(inverse[len(a) :], minlength=len(values))
    return int(np.minimum(ca, cb).sum())


def unambiguous(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """align(a, b) less every pair another alignment as good could make differently.

    Events left unpaired form gaps. Where the keys repeat around a gap (a one-off among
    events of one key, a layer skipped among layers run by one loop), part of the gap could
    sit further left or right with as many pairs: the events it could slide over have no
    certain partner, so their pairs are dropped.
    """
    ia, ib = align(a, b)
    drop_a = np.zeros(len(a), bool)
    drop_b = np.zeros(len(b), bool)
    ends_a = np.r_[-1, ia, len(a)]
    ends_b = np.r_[-1, ib, len(b)]
    for k in np.flatnonzero((np.diff(ends_a) > 1) | (np.diff(ends_b) > 1)).tolist():
        _mark_slides(a, ends_a[k] + 1, ends_a[k + 1], drop_a)
        _mark_slides(b, ends_b[k] + 1, ends_b[k + 1], drop_b)
    keep = ~drop_a[ia] & ~drop_b[ib]
    ia, ib = ia[keep], ib[keep]
    # Pairs whose key occurs as often in both steps anchor windows; inside each window
    # between two anchors, a key must occur as often on both sides.
    alike, unique = _context(a, b, ia, ib)
    anchor = (_same_occurrence(a, b, ia, ib) & alike) | unique
    wa = np.searchsorted(ia[anchor], np.arange(len(a)), side="right")
    wb = np.searchsorted(ib[anchor], np.arange(len(b)), side="right")
    span = int(max(a.max(initial=0), b.max(initial=0))) + 1
    keep = anchor | (_same_occurrence(wa * span + a, wb * span + b, ia, ib) & alike)
    return ia[keep], ib[keep]


_CONTEXT = 4  # events on each side of a pair that must match for its context to count


def _context(a: np.ndarray, b: np.ndarray, ia: np.ndarray, ib: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per pair: whether the keys around it (_CONTEXT each side, fewer at the ends) are the
    same in both steps; and whether that stretch also occurs nowhere else in either step."""
    width = 2 * _CONTEXT + 1
    pad = np.full(_CONTEXT, -1, np.int64)
    pa, pb = np.concatenate([pad, a, pad]), np.concatenate([pad, b, pad])  # steps start and end alike
    windows = np.concatenate([np.lib.stride_tricks.sliding_window_view(x, width) for x in (pa, pb)])
    if not len(ia):
        return np.zeros(0, bool), np.zeros(0, bool)
    _, ids = np.unique(windows, axis=0, return_inverse=True)
    ids = ids.reshape(-1)
    ida, idb = ids[: len(a)], ids[len(a) :]
    count_a = np.bincount(ida, minlength=int(ids.max()) + 1)
    count_b = np.bincount(idb, minlength=int(ids.max()) + 1)
    x, y = ida[ia], idb[ib]
    alike = x == y
    return alike, alike & (count_a[x] == 1) & (count_b[x] == 1)


def _same_occurrence(a: np.ndarray, b: np.ndarray, ia: np.ndarray, ib: np.ndarray) -> np.ndarray:
    """Per pair: whether its key occurs as often in a as in b, and the pair joins its k-th
    occurrence in a with its k-th in b. Where a key occurs more often in one step, any of
    its occurrences could be the extra one."""
    if not len(ia):
        return np.zeros(0, bool)
    values, inverse = np.unique(np.concatenate([a, b]), return_inverse=True)
    count_a = np.bincount(inverse[: len(a)], minlength=len(values))
    count_b = np.bincount(inverse[len(a) :], minlength=len(values))
    key = inverse[ia]
    return (count_a[key] == count_b[key]) & (_occurrence(a)[ia] == _occurrence(b)[ib])


def _occurrence(keys: np.ndarray) -> np.ndarray:
    """For each position, how many earlier positions hold the same key."""
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
    rank = np.empty(len(keys), np.int64)
    rank[order] = np.arange(len(keys)) - np.repeat(starts, np.diff(np.r_[starts, len(keys)]))
    return rank


def _mark_slides(keys: np.ndarray, g0: int, g1: int, drop: np.ndarray) -> None:
    """Mark the events that the gap keys[g0:g1], or a part of it, could slide over."""
    if g1 <= g0:
        return
    left = max(_common_run(keys[:p][::-1], keys[:g0][::-1]) for p in range(g0 + 1, g1 + 1))
    right = max(_common_run(keys[p:], keys[g1:]) for p in range(g0, g1))
    drop[g0 - left : g0] = True
    drop[g1 : g1 + right] = True


def _common_run(x: np.ndarray, y: np.ndarray) -> int:
    """How many leading elements x and y have in common (compared in growing chunks: runs are
    mostly short, and a gap tries this once per event in it)."""
    n = min(len(x), len(y))
    start, chunk = 0, 16
    while start < n:
        end = min(n, start + chunk)
        differ = x[start:end] != y[start:end]
        if differ.any():
            return start + int(np.argmax(differ))
        start, chunk = end, chunk * 4
    return n


def align(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positions (ia, ib) pairing two key sequences, in the order of `a`.

    The common head and tail pair directly; between them difflib.SequenceMatcher finds
    equal stretches. Events in stretches that differ do not pair.
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
    SequenceMatcher's equal stretches."""
    matcher = difflib.SequenceMatcher(None, a.tolist(), b.tolist())
    ia: list[np.ndarray] = [np.array([], np.int64)]
    ib: list[np.ndarray] = [np.array([], np.int64)]
    for tag, a0, a1, b0, b1 in matcher.get_opcodes():
        if tag == "equal":
            ia.append(np.arange(a0, a1))
            ib.append(np.arange(b0, b1))
    return np.concatenate(ia), np.concatenate(ib)
