"""Interning of stack frames and stacks, shared by both backends.

A stack is stored once as a list of frame ids; events refer to it by id.
New frames and stacks since the last call are handed to the writer in batches.
"""

from __future__ import annotations

import os

# vramscope's own frames (the module-hook wrapper around every module call) are left out
# of stacks, so that an allocation's stack is the same whether or not hooks ran.
OWN_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class StackInterner:
    def __init__(self) -> None:
        self._frame_ids: dict[tuple, int] = {}
        self._stack_ids: dict[tuple, int] = {}
        self._new_frames: list[tuple] = []
        self._new_stacks: list[tuple] = []

    def frame(self, filename: str, line: int, function: str) -> int:
        key = (filename, line, function)
        fid = self._frame_ids.get(key)
        if fid is None:
            fid = self._frame_ids[key] = len(self._frame_ids)
            self._new_frames.append((fid, filename, line, function))
        return fid

    def stack(self, frame_ids: tuple) -> int:
        sid = self._stack_ids.get(frame_ids)
        if sid is None:
            sid = self._stack_ids[frame_ids] = len(self._stack_ids)
            self._new_stacks.append((sid, list(frame_ids)))
        return sid

    def stack_of_frames(self, frames: list[dict]) -> int | None:
        """The stack id of torch's frame dicts (filename, line, name), without vramscope's own frames."""
        ids = tuple(self.frame(f["filename"], f["line"], f["name"]) for f in frames if not _own(f["filename"]))
        return self.stack(ids) if ids else None

    def take_new(self) -> tuple[dict | None, dict | None]:
        """Columns of frames and stacks added since the last call (None when none)."""
        frames = stacks = None
        if self._new_frames:
            f = self._new_frames
            frames = {
                "frame_id": [r[0] for r in f],
                "filename": [r[1] for r in f],
                "line": [r[2] for r in f],
                "function": [r[3] for r in f],
            }
            self._new_frames = []
        if self._new_stacks:
            s = self._new_stacks
            stacks = {"stack_id": [r[0] for r in s], "frame_ids": [r[1] for r in s]}
            self._new_stacks = []
        return frames, stacks


def _own(filename: str) -> bool:
    return filename.startswith(OWN_DIR + os.sep)
