"""Rebuilding the allocator state at the start of a snapshot's history.

A snapshot holds the segment map at dump time (`segments`) and the allocator's
history before it (`device_traces`, a ring buffer that may have wrapped, so that
it starts mid-run). A vramscope trace wants the segment map at the *start* of its
events, so the start map is rebuilt by rewinding: begin from the dump-time map
and undo the trace entries newest first (an alloc makes its block free again, a
free_completed makes it pending, a free_requested allocated, a segment_alloc
removes the segment, a segment_free restores it). Blocks freed in the trace but
allocated before it began thereby become part of the start state, which is what
a wrapped ring needs.

What the rewind cannot know, it estimates, and counts (`estimated`, `misses`):
- the block size of an allocation freed in the trace and still unfreed at its
  start: the request rounded as the allocator rounds it, widened to the whole
  free gap when the allocator would not have split that gap;
- a block freed in the trace that lies in no known segment is kept outside any
  segment (`segment_list` returns it apart).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from profiler.interop.memviz.sorted_ints import SortedInts
from profiler.trace import schema
from profiler.trace.finalize.blocks import SMALL_BUFFER, AllocatorRules

_INACTIVE = schema.BlockState.INACTIVE.value
_ALLOCATED = schema.BlockState.ACTIVE_ALLOCATED.value
_PENDING = schema.BlockState.ACTIVE_PENDING_FREE.value


@dataclass
class _Seg:
    addr: int
    size: int
    stream: int = 0
    segment_type: str = "large"
    is_expandable: bool = False


@dataclass
class _Blk:
    addr: int
    size: int
    requested: int
    state: str
    frames: list | None = None


@dataclass
class Rewind:
    """The allocator state at some point, with the means to step it back.

    Live blocks and segments are also kept as sorted address sets, so that finding the segment
    around an address or the next live block costs a bisection, not a scan: a snapshot may hold
    millions of blocks, and each trace entry asks once."""

    rules: AllocatorRules = field(default_factory=AllocatorRules)
    segments: dict[int, _Seg] = field(default_factory=dict)
    blocks: dict[int, _Blk] = field(default_factory=dict)  # live (not inactive) blocks
    misses: int = 0  # entries that did not fit the state
    estimated: int = 0  # block sizes estimated from a request
    _seg_addrs: SortedInts = field(default_factory=SortedInts)
    _blk_addrs: SortedInts = field(default_factory=SortedInts)

    @classmethod
    def from_segments(cls, segments: list[dict], rules: AllocatorRules) -> Rewind:
        r = cls(rules=rules)
        for seg in segments:
            s = _Seg(
                seg["address"],
                seg["total_size"],
                int(seg.get("stream", 0) or 0),
                seg.get("segment_type") or ("small" if seg["total_size"] == SMALL_BUFFER else "large"),
                bool(seg.get("is_expandable", False)),
            )
            r.segments[s.addr] = s
            addr = s.addr
            for b in seg.get("blocks", []):
                baddr = b.get("address", addr)
                if b["state"] != _INACTIVE:
                    r.blocks[baddr] = _Blk(
                        baddr, b["size"], b.get("requested_size", b["size"]), b["state"], b.get("frames")
                    )
                addr = baddr + b["size"]
        r._seg_addrs = SortedInts(r.segments)
        r._blk_addrs = SortedInts(r.blocks)
        return r

    def _add_segment(self, s: _Seg) -> None:
        self.segments[s.addr] = s
        self._seg_addrs.add(s.addr)

    def _drop_segment(self, addr: int) -> _Seg | None:
        self._seg_addrs.discard(addr)
        return self.segments.pop(addr, None)

    def _add_block(self, b: _Blk) -> None:
        self.blocks[b.addr] = b
        self._blk_addrs.add(b.addr)

    def _drop_block(self, addr: int) -> _Blk | None:
        self._blk_addrs.discard(addr)
        return self.blocks.pop(addr, None)

    def segment_of(self, addr: int) -> _Seg | None:
        start = self._seg_addrs.floor(addr)
        s = self.segments.get(start) if start is not None else None
        return s if s is not None and addr < s.addr + s.size else None

    def _any_block_in(self, addr: int, end: int) -> bool:
        first = self._blk_addrs.ceiling(addr)
        return first is not None and first < end

    def undo(self, e: dict) -> None:
        action, addr, size = e["action"], e.get("addr", 0) or 0, e.get("size", 0) or 0
        if action == "alloc":
            b = self._drop_block(addr)
            if b is None or b.state != _ALLOCATED:
                self.misses += 1
        elif action == "free_requested":
            b = self.blocks.get(addr)
            if b is not None and b.state == _PENDING:
                b.state = _ALLOCATED
            elif b is None:
                self.misses += 1
                self._restore(addr, size, _ALLOCATED, e.get("frames"))
            else:
                self.misses += 1
        elif action == "free_completed":
            if addr in self.blocks:
                self.misses += 1
                return
            self._restore(addr, size, _PENDING, e.get("frames"))
        elif action in ("segment_alloc", "segment_free"):
            self._undo_segment(action, addr, size, e)
        elif action in ("segment_map", "segment_unmap"):
            self._undo_map(action, addr, size, e)

    def _undo_segment(self, action: str, addr: int, size: int, e: dict) -> None:
        if action == "segment_alloc":
            s = self._drop_segment(addr)
            if s is None or self._any_block_in(s.addr, s.addr + s.size):
                self.misses += 1
        elif addr in self.segments:
            self.misses += 1
        else:
            small = "small" if size == SMALL_BUFFER else "large"
            self._add_segment(_Seg(addr, size, int(e.get("stream", 0) or 0), small))

    def _undo_map(self, action: str, addr: int, size: int, e: dict) -> None:
        if action == "segment_map":
            # The segment grew by this mapping at its end: shrink it back.
            s = self.segment_of(addr + size - 1) if size else None
            if s is not None and s.addr + s.size == addr + size and s.size >= size:
                s.size -= size
                if not s.size:
                    self._drop_segment(s.addr)
                return
            self.misses += 1
            return
        s = self.segment_of(addr - 1)
        if s is not None and s.addr + s.size == addr:
            s.size += size
            return
        self._add_segment(_Seg(addr, size, int(e.get("stream", 0) or 0), "large", True))

    def _restore(self, addr: int, requested: int, state: str, frames) -> None:
        """Bring back a block freed later: its size is estimated from the request."""
        size = self.rules.round_size(requested)
        seg = self.segment_of(addr)
        if seg is not None:
            # The free gap the block lies in, up to the next live block or the segment's end.
            nxt = self._blk_addrs.ceiling(addr + 1)
            end = seg.addr + seg.size
            gap = (nxt if nxt is not None and nxt < end else end) - addr
            small = seg.segment_type == "small"
            if gap >= size and not self.rules.should_split(gap, size, small):
                size = gap  # handed out whole
            size = min(size, max(gap, 0)) or size
        self.estimated += 1
        self._add_block(_Blk(addr, size, requested, state, frames))

    def segment_list(self) -> tuple[list[dict], list[_Blk]]:
        """(segments in the snapshot's shape, with gaps as inactive blocks; live blocks in no segment)."""
        out = []
        placed: set[int] = set()
        for start in self._seg_addrs:
            s = self.segments[start]
            end = s.addr + s.size
            inside = [self.blocks[a] for a in self._blk_addrs.between(s.addr, end)]
            blocks, at = [], s.addr
            for b in inside:
                placed.add(b.addr)
                if b.addr < at:  # overlaps the block before: the state is inconsistent there
                    self.misses += 1
                    continue
                if b.addr > at:
                    blocks.append(dict(address=at, size=b.addr - at, requested_size=0, state=_INACTIVE, frames=[]))
                size = min(b.size, end - b.addr)
                blocks.append(
                    dict(address=b.addr, size=size, requested_size=b.requested, state=b.state, frames=b.frames or [])
                )
                at = b.addr + size
            if at < end:
                blocks.append(dict(address=at, size=end - at, requested_size=0, state=_INACTIVE, frames=[]))
            out.append(
                dict(
                    address=s.addr,
                    total_size=s.size,
                    stream=s.stream,
                    segment_type=s.segment_type,
                    is_expandable=s.is_expandable,
                    blocks=blocks,
                )
            )
        orphans = [self.blocks[a] for a in self._blk_addrs if a not in placed]
        return out, orphans
