"""Replays the caching allocator's block geometry to recover each allocation's block size.

torch's memory history records the *requested* size of every alloc and free,
while `memory_allocated()` counts *block* sizes: requests are rounded up, and
a large block is handed out whole when splitting it would leave 1 MiB or less.
To reproduce the allocator's own counters byte for byte we replay its block
layout: the segment map at capture start gives every block, and each event
says exactly which address was used, so only the rounding and split rules are
needed, not the allocator's search policy. The rules follow
c10/cuda/CUDACachingAllocator.cpp (round_size, should_split, merges on free).

The same replay gives fragmentation facts (free blocks inside segments) to the
analysis. Pure Python: it runs at finalize time in the profiled process.
"""

from __future__ import annotations

from dataclasses import dataclass, field

MIN_BLOCK = 512  # kMinBlockSize
SMALL_SIZE = 1 << 20  # kSmallSize: requests up to this use the small pool
SMALL_BUFFER = 2 << 20  # kSmallBuffer: size of a small-pool segment
ROUNDUP_START = 1 << 20  # kRoundUpPowerOfTwoStart
ROUNDUP_INTERVALS = 16


@dataclass
class AllocatorRules:
    """The allocator settings that change block sizes (from the snapshot's allocator_settings)."""

    max_split_size: int = 1 << 62
    expandable_segments: bool = False
    roundup_divisions: tuple[int, ...] = (0,) * ROUNDUP_INTERVALS

    @classmethod
    def from_settings(cls, settings: dict | None) -> AllocatorRules:
        s = settings or {}
        mss = s.get("max_split_size", -1)
        div = s.get("roundup_power2_divisions") or {}
        if isinstance(div, dict):
            keys = sorted(div, key=lambda k: int(k))
            divisions = tuple(int(div[k]) for k in keys)[:ROUNDUP_INTERVALS]
        else:
            divisions = tuple(int(d) for d in div)[:ROUNDUP_INTERVALS]
        divisions += (0,) * (ROUNDUP_INTERVALS - len(divisions))
        return cls(
            max_split_size=mss if mss and mss > 0 else 1 << 62,
            expandable_segments=bool(s.get("expandable_segments", False)),
            roundup_divisions=divisions,
        )

    def round_size(self, size: int) -> int:
        if size < MIN_BLOCK:
            return MIN_BLOCK
        divisions = self._divisions(size)
        if divisions > 1 and size > MIN_BLOCK * divisions:
            return _roundup_power2_next_division(size, divisions)
        return MIN_BLOCK * ((size + MIN_BLOCK - 1) // MIN_BLOCK)

    def _divisions(self, size: int) -> int:
        log_size = size.bit_length() - 1
        start = ROUNDUP_START.bit_length() - 1
        index = log_size - start if log_size > start else 0
        return self.roundup_divisions[min(index, ROUNDUP_INTERVALS - 1)]

    def should_split(self, block_size: int, size: int, small: bool) -> bool:
        remaining = block_size - size
        if small or self.expandable_segments:
            return remaining >= MIN_BLOCK
        return size < self.max_split_size and remaining > SMALL_SIZE


def _roundup_power2_next_division(size: int, divisions: int) -> int:
    if size & (size - 1) == 0:
        return size
    floor = 1 << (size.bit_length() - 1)
    step = floor >> (divisions.bit_length() - 1)
    if step == 0:
        return floor << 1
    rounded = size & ~(step - 1)
    return size if rounded == size else rounded + step


@dataclass(slots=True)
class _Block:
    addr: int
    size: int
    segment: int  # segment start address (an id)
    allocated: bool = False


@dataclass
class BlockReplay:
    """Block layout over time. Feed events in stream order with `apply`."""

    rules: AllocatorRules = field(default_factory=AllocatorRules)
    blocks: dict[int, _Block] = field(default_factory=dict)  # by start address
    ends: dict[int, int] = field(default_factory=dict)  # block end -> block start
    small_segments: set[int] = field(default_factory=set)
    segment_bytes: dict[int, int] = field(default_factory=dict)
    misses: int = 0  # events that did not fit the replayed layout

    def load_segments(self, rows) -> None:
        """rows: (segment_addr, segment_bytes, segment_type, block_addr, block_bytes, state)."""
        for seg_addr, seg_bytes, seg_type, addr, size, state in rows:
            self.segment_bytes[seg_addr] = seg_bytes
            if seg_type == "small":
                self.small_segments.add(seg_addr)
            self._put(_Block(addr, size, seg_addr, allocated=state != "inactive"))

    def _put(self, b: _Block) -> None:
        self.blocks[b.addr] = b
        self.ends[b.addr + b.size] = b.addr

    def _drop(self, b: _Block) -> None:
        del self.blocks[b.addr]
        if self.ends.get(b.addr + b.size) == b.addr:
            del self.ends[b.addr + b.size]

    def alloc(self, addr: int, requested: int) -> int:
        size = self.rules.round_size(requested)
        b = self.blocks.get(addr)
        if b is None or b.allocated or b.size < size:
            self.misses += 1
            return size
        small = b.segment in self.small_segments
        if self.rules.should_split(b.size, size, small):
            self._drop(b)
            self._put(_Block(addr + size, b.size - size, b.segment))
            b.size = size
            self._put(b)
        b.allocated = True
        return b.size

    def free(self, addr: int, requested: int) -> int:
        b = self.blocks.get(addr)
        if b is None or not b.allocated:
            self.misses += 1
            return self.rules.round_size(requested)
        size = b.size
        b.allocated = False
        nxt = self.blocks.get(addr + size)
        if nxt is not None and not nxt.allocated and nxt.segment == b.segment:
            self._drop(nxt)
            self._drop(b)
            b.size += nxt.size
            self._put(b)
        prev_addr = self.ends.get(addr)
        prev = self.blocks.get(prev_addr) if prev_addr is not None else None
        if prev is not None and not prev.allocated and prev.segment == b.segment:
            self._drop(b)
            self._drop(prev)
            prev.size += b.size
            self._put(prev)
        return size

    def segment_alloc(self, addr: int, size: int) -> None:
        self.segment_bytes[addr] = size
        if size == SMALL_BUFFER and not self.rules.expandable_segments:
            self.small_segments.add(addr)
        self._put(_Block(addr, size, addr))

    def segment_free(self, addr: int, size: int) -> None:
        self.segment_bytes.pop(addr, None)
        self.small_segments.discard(addr)
        for b in [b for b in self.blocks.values() if b.segment == addr]:
            self._drop(b)

    def segment_map(self, addr: int, size: int) -> None:
        """Expandable segments grow by mapping pages at the end of a free block."""
        prev_addr = self.ends.get(addr)
        prev = self.blocks.get(prev_addr) if prev_addr is not None else None
        if prev is not None and not prev.allocated:
            self._drop(prev)
            prev.size += size
            self._put(prev)
            self.segment_bytes[prev.segment] = self.segment_bytes.get(prev.segment, 0) + size
        else:
            seg = prev.segment if prev is not None else addr
            self.segment_bytes[seg] = self.segment_bytes.get(seg, 0) + size
            self._put(_Block(addr, size, seg))

    def segment_unmap(self, addr: int, size: int) -> None:
        for b in list(self.blocks.values()):
            if not b.allocated and b.addr <= addr and addr + size <= b.addr + b.size:
                self._drop(b)
                head, tail = addr - b.addr, b.addr + b.size - (addr + size)
                if head:
                    self._put(_Block(b.addr, head, b.segment))
                if tail:
                    self._put(_Block(addr + size, tail, b.segment))
                self.segment_bytes[b.segment] = self.segment_bytes.get(b.segment, 0) - size
                return
        self.misses += 1


def block_sizes(actions, addrs, sizes, replay: BlockReplay) -> list:
    """Block bytes per event (None for events that are not block events).

    Exactly `replay.alloc` for an alloc, `replay.free` for a free_completed, the
    block's size (or the rounded request) for a free_requested, and the
    segment methods for segment events, applied in order; tests hold it to
    that. (long: the alloc and free paths are inlined, dict operation for dict
    operation, because this loop runs once per event at finalize, in the profiled
    process, where a method call per event costs more than the work.)
    """
    blocks = replay.blocks
    ends = replay.ends
    get = blocks.get
    end_get = ends.get
    small_segments = replay.small_segments
    rules = replay.rules
    round_size = rules.round_size
    loose = rules.expandable_segments  # split whenever a minimum block remains
    max_split = rules.max_split_size
    new_block = _Block
    rounded: dict = {}  # request -> rules.round_size(request)
    out: list = []
    emit = out.append
    misses = 0
    try:
        for action, addr, size in zip(actions, addrs, sizes):
            if action == "alloc":
                want = rounded.get(size)
                if want is None:
                    want = rounded[size] = round_size(size)
                b = get(addr)
                if b is None or b.allocated or b.size < want:
                    misses += 1
                    emit(want)
                    continue
                have = b.size
                rest = have - want
                if (
                    rest >= MIN_BLOCK
                    if loose or b.segment in small_segments
                    else want < max_split and rest > SMALL_SIZE
                ):
                    del blocks[addr]  # _drop(b)
                    if end_get(addr + have) == addr:
                        del ends[addr + have]
                    tail = addr + want  # _put(the remainder)
                    blocks[tail] = new_block(tail, rest, b.segment)
                    ends[addr + have] = tail
                    b.size = have = want  # _put(b)
                    blocks[addr] = b
                    ends[tail] = addr
                b.allocated = True
                emit(have)
            elif action == "free_completed":
                b = get(addr)
                if b is None or not b.allocated:
                    misses += 1
                    want = rounded.get(size)
                    if want is None:
                        want = rounded[size] = round_size(size)
                    emit(want)
                    continue
                have = b.size
                b.allocated = False
                seg = b.segment
                at = addr + have
                nxt = get(at)
                if nxt is not None and not nxt.allocated and nxt.segment == seg:
                    grow = nxt.size
                    del blocks[at]  # _drop(nxt)
                    if end_get(at + grow) == at:
                        del ends[at + grow]
                    del blocks[addr]  # _drop(b)
                    if end_get(at) == addr:
                        del ends[at]
                    b.size = merged = have + grow  # _put(b)
                    blocks[addr] = b
                    ends[addr + merged] = addr
                prev_addr = end_get(addr)
                if prev_addr is not None:
                    prev = get(prev_addr)
                    if prev is not None and not prev.allocated and prev.segment == seg:
                        mine = b.size
                        del blocks[addr]  # _drop(b)
                        if end_get(addr + mine) == addr:
                            del ends[addr + mine]
                        theirs = prev.size  # _drop(prev)
                        del blocks[prev_addr]
                        if end_get(prev_addr + theirs) == prev_addr:
                            del ends[prev_addr + theirs]
                        prev.size = merged = theirs + mine  # _put(prev)
                        blocks[prev_addr] = prev
                        ends[prev_addr + merged] = prev_addr
                emit(have)
            elif action == "free_requested":
                b = get(addr)
                if b is not None and b.allocated:
                    emit(b.size)
                else:
                    want = rounded.get(size)
                    if want is None:
                        want = rounded[size] = round_size(size)
                    emit(want)
            elif action == "segment_alloc":
                replay.segment_alloc(addr, size)
                emit(None)
            elif action == "segment_free":
                replay.segment_free(addr, size)
                emit(None)
            elif action == "segment_map":
                replay.segment_map(addr, size)
                emit(None)
            elif action == "segment_unmap":
                replay.segment_unmap(addr, size)
                emit(None)
            else:
                emit(None)
    finally:
        replay.misses += misses
    return out
