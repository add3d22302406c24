"""A device's trace entries as columns, whichever reader read the snapshot.

The standard unpickler gives a list of entry dicts (`from_dicts`); the streaming reader gives
columns of every entry straight from the pickle (stream.py). Both become one `Entries`, so the
rewind, the window and the tables are computed by the same code from the same values. A
missing or None field is 0, as the import has always read it; `frames` holds what the stack
interner takes (a frame list, or a stack handle of the streaming reader, 0 for none).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from profiler.trace.finalize import markers
from profiler.trace.tags import TAG_SEP, make_tag

MAX_TEXT = 4096  # characters kept of a file or function name, or of user_metadata


def tag_of(user_metadata) -> str:
    """A vramscope tag for an entry's user_metadata: taken whole if it is one, else the module."""
    if not user_metadata or not isinstance(user_metadata, str):
        return ""
    user_metadata = user_metadata[:MAX_TEXT]
    if user_metadata.startswith(markers.PREFIX) or user_metadata.count(TAG_SEP) == 2:
        return user_metadata
    return make_tag(None, user_metadata, None)


@dataclass
class Entries:
    action: list[str]
    addr: np.ndarray  # int64, as are size, stream and time_us
    size: np.ndarray
    stream: np.ndarray
    time_us: np.ndarray
    frames: list | np.ndarray
    tags: list[str]

    @classmethod
    def from_dicts(cls, entries: list[dict]) -> Entries:
        """Columns of checked entry dicts (load.check_snapshot: every integer fits int64)."""

        def ints(key: str) -> np.ndarray:
            return np.fromiter((e.get(key) or 0 for e in entries), dtype=np.int64, count=len(entries))

        return cls(
            action=[e["action"] for e in entries],
            addr=ints("addr"),
            size=ints("size"),
            stream=ints("stream"),
            time_us=ints("time_us"),
            frames=[e.get("frames") for e in entries],
            tags=[tag_of(e.get("user_metadata")) for e in entries],
        )

    def __len__(self) -> int:
        return len(self.action)

    def window(self, first: int, end: int) -> Entries:
        return Entries(
            action=self.action[first:end],
            addr=self.addr[first:end],
            size=self.size[first:end],
            stream=self.stream[first:end],
            time_us=self.time_us[first:end],
            frames=self.frames[first:end],
            tags=self.tags[first:end],
        )

    def entry(self, i: int) -> dict:
        """Entry i as the rewind reads it."""
        frames = self.frames[i]
        return {
            "action": self.action[i],
            "addr": int(self.addr[i]),
            "size": int(self.size[i]),
            "stream": int(self.stream[i]),
            "frames": int(frames) if isinstance(frames, np.integer) else frames,
        }
