"""Allocation sites as a person reads them: each stack's innermost frame of the user's own code.

A captured stack starts deep in torch (the op, the allocator's hooks) and vramscope's own
wrappers; the line that explains an allocation is the innermost frame outside them. A stack
made only of library frames keeps its innermost frame, so that every stack gets a label.
"""

from __future__ import annotations

import re
from pathlib import PurePath

import pandas as pd

# torch and its relatives, Python's own machinery, and vramscope itself.
_LIBRARY = re.compile(
    r"(/site-packages/|/dist-packages/|^<frozen |/lib/python3\.\d+/|/torch/|/profiler/(capture|trace|integrations)/)"
)


def is_library_frame(filename: str) -> bool:
    return bool(_LIBRARY.search(str(filename)))


def site_labels(frames: pd.DataFrame, stacks: pd.DataFrame) -> dict[int, str]:
    """stack_id -> "file.py:line function" of its innermost user frame (else its innermost frame)."""
    if frames.empty or stacks.empty:
        return {}
    names = {
        int(f): (f"{PurePath(str(file)).name}:{line} {fn}", is_library_frame(file))
        for f, file, line, fn in zip(frames["frame_id"], frames["filename"], frames["line"], frames["function"])
    }
    out = {}
    for sid, chain in zip(stacks["stack_id"], stacks["frame_ids"]):
        labelled = [names[int(f)] for f in (chain if chain is not None else []) if int(f) in names]
        if not labelled:
            continue
        user = [label for label, library in labelled if not library]
        out[int(sid)] = user[0] if user else labelled[0][0]
    return out


def site_of(stack_id, labels: dict[int, str], none: str = "(no stack)") -> str:
    """The label of one stack_id (None or NA: `none`)."""
    if stack_id is None or pd.isna(stack_id):
        return none
    return labels.get(int(stack_id), f"stack {int(stack_id)}")
