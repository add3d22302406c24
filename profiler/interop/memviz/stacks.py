"""The frames and stacks tables of an imported snapshot.

Ids go to stacks and frames in order of first use as the tables are written (the start
segment map, the events, the end segment map), so a run's ids do not depend on which reader
read the pickle: `Interner` interns the standard unpickler's frame lists, `StreamStacks` the
streaming reader's stack handles, and both give the same tables for the same snapshot.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import pyarrow as pa

from profiler.interop.memviz.entries import MAX_TEXT
from profiler.interop.memviz.load import is_int

MAX_STACK_DEPTH = 1024  # frames kept per stack, innermost first
STACKS_PER_BATCH = 1 << 14  # stacks per part of the table written (one row group each)


def _text(v) -> str:
    return v[:MAX_TEXT] if isinstance(v, str) else "?"


def _line(v) -> int:
    return v if is_int(v) and -(1 << 31) <= v < (1 << 31) else 0


def frame_key(f: dict) -> tuple[str, int, str]:
    return (_text(f.get("filename")), _line(f.get("line")), _text(f.get("name")))


def _frames_table(keys: Sequence[tuple]) -> dict:
    return {
        "frame_id": list(range(len(keys))),
        "filename": [k[0] for k in keys],
        "line": [k[1] for k in keys],
        "function": [k[2] for k in keys],
    }


class Interner:
    """Ids for distinct frames and stacks of frame lists.

    torch builds each distinct frame dict once and each distinct traceback's list once, and
    pickle keeps that sharing, so a list or dict met again is looked up by identity and never
    walked twice (the snapshot keeps them alive, so their ids stay theirs). A stack keeps its
    innermost MAX_STACK_DEPTH frames; `truncated` counts the stacks cut."""

    def __init__(self):
        self.frame_ids: dict[tuple, int] = {}
        self.stack_ids: dict[tuple, int] = {}
        self._frame_of: dict[int, int] = {}  # id(frame dict) -> frame id
        self._stack_of: dict[int, int | None] = {}  # id(frames list) -> stack id
        self.truncated = 0

    def assign(self, parts: Sequence) -> list[list]:
        """Stack ids (None for none) of each part's frame lists, parts in the order written."""
        return [[self.stack(frames) for frames in part] for part in parts]

    def stack(self, frames) -> int | None:
        if not frames or not isinstance(frames, list):
            return None
        known = self._stack_of.get(id(frames), -1)
        if known != -1:
            return known
        if len(frames) > MAX_STACK_DEPTH:
            self.truncated += 1
        key = tuple(self._frame(f) for f in frames[:MAX_STACK_DEPTH] if isinstance(f, dict))
        sid = self.stack_ids.setdefault(key, len(self.stack_ids)) if key else None
        self._stack_of[id(frames)] = sid
        return sid

    def _frame(self, f: dict) -> int:
        fid = self._frame_of.get(id(f))
        if fid is None:
            fid = self._frame_of[id(f)] = self.frame_ids.setdefault(frame_key(f), len(self.frame_ids))
        return fid

    def write(self, writer) -> None:
        writer.append("frames", _frames_table(list(self.frame_ids)))  # dicts keep insertion (id) order
        writer.publish("stacks", [{"stack_id": list(range(len(self.stack_ids))), "frame_ids": list(self.stack_ids)}])


class StreamStacks:
    """Ids for the streaming reader's stack handles (an int from 1; 0 or [] for none).

    The reader holds each traceback as the ordinals of its frame dicts (pickle_scan.cpp);
    here the frames' content keys are computed once per distinct frame dict, and the reader
    gives ids in order of first use, as Interner does."""

    def __init__(self, scan, frame_dicts: list[dict]):
        self._scan = scan
        keys: dict[tuple, int] = {}
        self._ckey = np.array([keys.setdefault(frame_key(f), len(keys)) for f in frame_dicts], dtype=np.int64)
        self._keys = list(keys)
        self._frame_order = np.zeros(0, dtype=np.int64)
        self._stacks = 0
        self.truncated = 0

    def assign(self, parts: Sequence) -> list[pa.Array]:
        arrays = [np.asarray([h or 0 for h in p] if isinstance(p, list) else p, dtype=np.int64) for p in parts]
        order = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int64)
        ids, self._frame_order, self.truncated, self._stacks = self._scan.finish(order, self._ckey)
        out, at = [], 0
        for a in arrays:
            part = ids[at : at + len(a)]
            out.append(pa.array(part, pa.int32(), mask=part < 0))
            at += len(a)
        return out

    def write(self, writer) -> None:
        writer.append("frames", _frames_table([self._keys[c] for c in self._frame_order]))
        writer.publish("stacks", self._parts())
        self._scan.release()  # the stacks are on disk: the reader's copy goes before finalizing

    def _parts(self) -> Iterator[dict]:
        for first in range(0, self._stacks, STACKS_PER_BATCH):
            end = min(first + STACKS_PER_BATCH, self._stacks)
            offsets, values = self._scan.stacks(first, end)
            yield {
                "stack_id": pa.array(np.arange(first, end, dtype=np.int32)),
                "frame_ids": pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values)),
            }
