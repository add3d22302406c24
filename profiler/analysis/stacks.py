"""Allocation sites as a tree of frames: which call paths hold the bytes of a live set.

A trace's stacks table maps stack_id to frame_ids (innermost first) and its frames
table names each frame. stack_tree folds the largest sites of a live set (live.live_at,
live.alive_at_peak) into parent/child rows, outermost frame at the root, so that a
node's bytes are the sum of the sites below it: the shape an icicle or a flame graph draws.
"""

from __future__ import annotations

from pathlib import PurePath

import pandas as pd

TREE_COLUMNS = ["id", "parent", "label", "bytes"]
NO_STACK = "(no stack)"


def frame_labels(frames: pd.DataFrame) -> dict[int, str]:
    """frame_id -> "function (file.py:line)"."""
    return {
        int(f): f"{fn} ({PurePath(str(file)).name}:{line})"
        for f, file, line, fn in zip(frames["frame_id"], frames["filename"], frames["line"], frames["function"])
    }


def stack_tree(
    live: pd.DataFrame, stacks: pd.DataFrame, frames: pd.DataFrame, top: int = 40, depth: int = 12
) -> pd.DataFrame:
    """id, parent, label, bytes: the `top` allocation sites alive in `live` as a tree of frames.

    Each site keeps its `depth` innermost frames; bytes without a stack are one root,
    NO_STACK. A node's id is its path from the root, so that equal frames reached by
    different paths stay apart; a root's parent is "".
    """
    if live.empty:
        return pd.DataFrame(columns=TREE_COLUMNS)
    by_stack = (
        live.assign(stack_id=live["stack_id"].astype("Int64"))
        .groupby("stack_id", dropna=False)["size_bytes"]
        .sum()
        .sort_values(ascending=False)
        .head(top)
    )
    names = frame_labels(frames)
    chains = {int(s): list(f) for s, f in zip(stacks["stack_id"], stacks["frame_ids"]) if f is not None}
    nodes: dict[str, list] = {}
    for sid, size in by_stack.items():
        chain = chains.get(int(sid), []) if pd.notna(sid) else []
        path = [names.get(int(f), f"frame {f}") for f in reversed(chain)][-depth:] or [NO_STACK]
        parent = ""
        for label in path:
            node = parent + "/" + label if parent else label
            entry = nodes.setdefault(node, [node, parent, label, 0])
            entry[3] += int(size)
            parent = node
    return pd.DataFrame(list(nodes.values()), columns=TREE_COLUMNS)
