"""What both CPU backends (cpu.py, native_cpu.py) answer alike: host memory has no
caching allocator, hence no segments and no out-of-memory observer, and their events
are their own buffers, so draining is cheap and the count of drained events is an
exact position."""

from __future__ import annotations


class HostMemory:
    name = "cpu"
    positions_need_drain = True
    start_segments: dict | None = None  # no caching allocator, no segments
    events_seen: int

    def segments_now(self, kind, ts_us, event_index):
        return None

    def position(self, step: int) -> int:
        """The count of drained events: exact once the caller has drained."""
        return self.events_seen

    def install_oom_observer(self, callback) -> None:
        pass  # host memory has no allocator observer

    def remove_oom_observer(self) -> None:
        pass
