"""A sorted set of integers for the rewind's address lookups.

A plain sorted list costs a memmove of the whole list per insertion, which at a few
million live blocks is milliseconds per trace entry. Buckets of about a thousand keep
each insertion or removal to a short memmove and each lookup to two bisections.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Iterator

_LOAD = 1000  # a bucket is split in two past 2 x _LOAD


class SortedInts:
    def __init__(self, values: Iterable[int] = ()):
        ordered = sorted(set(values))
        self._buckets = [ordered[i : i + _LOAD] for i in range(0, len(ordered), _LOAD)]
        self._maxes = [b[-1] for b in self._buckets]
        self._len = len(ordered)

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[int]:
        for b in self._buckets:
            yield from b

    def add(self, x: int) -> None:
        if not self._buckets:
            self._buckets, self._maxes, self._len = [[x]], [x], 1
            return
        i = min(bisect_left(self._maxes, x), len(self._buckets) - 1)
        b = self._buckets[i]
        j = bisect_left(b, x)
        if j < len(b) and b[j] == x:
            return
        b.insert(j, x)
        self._len += 1
        self._maxes[i] = b[-1]
        if len(b) > 2 * _LOAD:
            self._buckets[i : i + 1] = [b[:_LOAD], b[_LOAD:]]
            self._maxes[i : i + 1] = [b[_LOAD - 1], b[-1]]

    def discard(self, x: int) -> None:
        i = bisect_left(self._maxes, x)
        if i == len(self._buckets):
            return
        b = self._buckets[i]
        j = bisect_left(b, x)
        if j == len(b) or b[j] != x:
            return
        del b[j]
        self._len -= 1
        if b:
            self._maxes[i] = b[-1]
        else:
            del self._buckets[i], self._maxes[i]

    def ceiling(self, x: int) -> int | None:
        """The smallest member >= x, or None."""
        i = bisect_left(self._maxes, x)
        if i == len(self._buckets):
            return None
        b = self._buckets[i]
        return b[bisect_left(b, x)]

    def floor(self, x: int) -> int | None:
        """The largest member <= x, or None."""
        i = bisect_left(self._maxes, x)
        if i < len(self._buckets):
            b = self._buckets[i]
            j = bisect_left(b, x)
            if j < len(b) and b[j] == x:
                return x
            if j > 0:
                return b[j - 1]
        return self._buckets[i - 1][-1] if i > 0 else None

    def between(self, low: int, end: int) -> Iterator[int]:
        """Members in [low, end), ascending."""
        i = bisect_left(self._maxes, low)
        if i == len(self._buckets):
            return
        j = bisect_left(self._buckets[i], low)
        for b in self._buckets[i:]:
            for x in b[j:]:
                if x >= end:
                    return
                yield x
            j = 0
