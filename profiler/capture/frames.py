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
        ids = tuple(self.frame(f["filename"], f["line"], f["name"]) for f in frames if not own_frame(f["filename"]))
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


class PythonStacks:
    """Stack ids of the running Python stack, walked cheaply enough to run per allocation.

    A frame's site is keyed by (id(code), f_lasti): two ints hash fast, where a code
    object's own hash covers its bytecode and constants, and f_lineno is decoded from
    the line table. The code object is kept beside its sites, so that an id reused by
    a new code object (generated code, freed) is told apart. Frames whose file starts
    with `skip_prefix` (the capture's own) are left out.
    """

    def __init__(self, interner: StackInterner, skip_prefix: str, limit: int) -> None:
        self.interner = interner
        self.skip_prefix = skip_prefix
        self.limit = limit
        self._sites: dict[tuple[int, int], tuple[object, int]] = {}  # -> (code, frame id or -1)

    def stack_id(self, frame) -> int | None:
        """The interned stack from `frame` outwards (None when every frame is skipped)."""
        sites, limit = self._sites, self.limit
        ids: list[int] = []
        while frame is not None:
            code = frame.f_code
            key = (id(code), frame.f_lasti)
            site = sites.get(key)
            if site is None or site[0] is not code:
                site = sites[key] = (code, self._site(code, frame.f_lineno))
            if site[1] >= 0:
                ids.append(site[1])
                if len(ids) == limit:
                    break
            frame = frame.f_back
        return self.interner.stack(tuple(ids)) if ids else None

    def _site(self, code, line: int | None) -> int:
        if code.co_filename.startswith(self.skip_prefix):
            return -1
        return self.interner.frame(code.co_filename, line or 0, code.co_name)


def own_frame(filename: str) -> bool:
    """Whether a frame of `filename` is vramscope's own."""
    return filename.startswith(OWN_DIR + os.sep)
