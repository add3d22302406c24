"""Allocation sites as a tree of frames: which call paths hold the bytes of a live set.

A trace's stacks table maps stack_id to frame_ids (innermost first) and its frames
table names each frame. stack_tree folds the largest sites of a live set (live.live_at,
live.alive_at_peak) into parent/child rows, outermost frame at the root, so that a
node's bytes are the sum of the sites below it: the shape an icicle or a flame graph draws.
"""

from __future__ import annotations

import re
from pathlib import PurePath

import numpy as np
import pandas as pd

TREE_COLUMNS = ["id", "parent", "label", "bytes"]
SITE_COLUMNS = ["site", "total_bytes", "count", "share"]
NO_STACK = "(no stack)"
# Frames that are not the user's code: installed packages (torch, transformers), the standard
# library, code that torch generates (inductor's kernels), and vramscope's own hooks.
_LIBRARY = re.compile(
    r"(site-packages|dist-packages|/lib/python3[^/]*/|^<|torchinductor_|/profiler/(capture|trace|integrations|interop)/)"
)


# Library functions that only pass a call on (module __call__, decorators, dynamo's disable
# wrapper, vramscope's own hooks): the call a site names is the first frame inside them.
_WRAPPERS = frozenset(
    {
        "_fn",
        "inner",
        "_call_impl",
        "_wrapped_call_impl",
        "wrapper",
        "_use_grad",
        "maybe_fallback",
        "decorate_context",
        "__torch_function__",
    }
)


def is_library_frame(filename) -> bool:
    """A frame of torch, another package, the standard library, generated code or vramscope itself."""
    return bool(_LIBRARY.search(str(filename)))


def frame_labels(frames: pd.DataFrame) -> dict[int, str]:
    """frame_id -> "file.py:line function"."""
    return {
        int(f): f"{PurePath(str(file)).name}:{line} {fn}"
        for f, file, line, fn in zip(frames["frame_id"], frames["filename"], frames["line"], frames["function"])
    }


def user_frame_ids(frames: pd.DataFrame) -> set[int]:
    """The frame_ids that are the user's own code (is_library_frame false)."""
    return {int(f) for f, file in zip(frames["frame_id"], frames["filename"]) if not is_library_frame(file)}


def wrapper_frame_ids(frames: pd.DataFrame) -> set[int]:
    """The library frame_ids that only pass a call on (_WRAPPERS) or are vramscope's own."""
    return {
        int(f)
        for f, file, fn in zip(frames["frame_id"], frames["filename"], frames["function"])
        if is_library_frame(file) and (fn in _WRAPPERS or "/profiler/" in str(file))
    }


def _library_call(chain: list[int], user: set[int], wrappers: frozenset[int] | set[int]) -> int | None:
    """The innermost library frame below the user's innermost one that is not a wrapper: the call that
    allocated (cross_entropy, linear), or None when the user's own line allocated."""
    for f in chain:
        if f in user:
            return None
        if f not in wrappers:
            return f
    return None


def fold_library(chain: list[int], user: set[int], wrappers: frozenset[int] | set[int] = frozenset()) -> list[int]:
    """A stack (innermost first) with the library frames folded away: the user's frames, after the
    library call that allocated (_library_call) where there is one."""
    kept = [f for f in chain if f in user]
    call = _library_call(chain, user, wrappers)
    if call is not None:
        kept.insert(0, call)
    elif chain and not kept:
        kept = [chain[0]]
    return kept


def site_labels(stacks: pd.DataFrame, frames: pd.DataFrame) -> dict[int, str]:
    """stack_id -> the allocation site as a person names it: the innermost frame of the user's
    own code ("model.py:168 forward"), followed by the library call it made where that is where
    the bytes were allocated ("model.py:168 forward > functional.py:3462 cross_entropy", wrappers
    such as module __call__ and dynamo's skipped); a stack with neither is named by its innermost frame."""
    names, user, wrappers = frame_labels(frames), user_frame_ids(frames), wrapper_frame_ids(frames)
    out = {}
    for sid, chain in zip(stacks["stack_id"], stacks["frame_ids"]):
        if chain is None or not len(chain):
            continue
        chain = [int(f) for f in chain]
        mine = next((f for f in chain if f in user), None)
        call = _library_call(chain, user, wrappers)
        parts = [f for f in (mine, call) if f is not None] or [chain[0]]
        out[int(sid)] = " > ".join(names.get(f, f"frame {f}") for f in parts)
    return out


def site_breakdown(live: pd.DataFrame, stacks: pd.DataFrame, frames: pd.DataFrame) -> pd.DataFrame:
    """site, total_bytes, count, share: a live set's bytes by allocation site (site_labels), largest
    first; stacks that end at the same line of the user's code are one site, bytes with no stack
    are NO_STACK."""
    if live.empty:
        return pd.DataFrame(columns=SITE_COLUMNS)
    sids = live["stack_id"].astype("Int64")
    # Only the live set's stacks are named: an imported snapshot holds hundreds of thousands.
    labels = site_labels(stacks[stacks["stack_id"].isin(sids.dropna().unique())], frames)
    site = pd.Series([labels.get(int(s), NO_STACK) if pd.notna(s) else NO_STACK for s in sids], index=live.index)
    is_block = live["addr"].notna() if "addr" in live else pd.Series(True, index=live.index)
    g = pd.DataFrame({"site": site, "size_bytes": live["size_bytes"], "block": is_block}).groupby("site", sort=False)
    out = pd.DataFrame(
        {"total_bytes": g["size_bytes"].sum().astype(np.int64), "count": g["block"].sum().astype(np.int64)}
    ).reset_index()
    total = int(out["total_bytes"].sum())
    out["share"] = out["total_bytes"] / total if total else 0.0
    return out.sort_values(["total_bytes", "count"], ascending=False, kind="stable").reset_index(drop=True)


def stack_tree(
    live: pd.DataFrame,
    stacks: pd.DataFrame,
    frames: pd.DataFrame,
    top: int = 40,
    depth: int = 12,
    fold: bool = False,
) -> pd.DataFrame:
    """id, parent, label, bytes: the `top` allocation sites alive in `live` as a tree of frames.

    Each site keeps its `depth` innermost frames (fold: library frames folded away first,
    fold_library); bytes without a stack are one root, NO_STACK. A node's id is its path from
    the root, so that equal frames reached by different paths stay apart; a root's parent is "".
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
    chains = {int(s): [int(x) for x in f] for s, f in zip(stacks["stack_id"], stacks["frame_ids"]) if f is not None}
    if fold:
        user, wrappers = user_frame_ids(frames), wrapper_frame_ids(frames)
        chains = {s: fold_library(c, user, wrappers) for s, c in chains.items()}
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
