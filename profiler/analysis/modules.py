"""Per-module accounting: what each module allocated, kept, and held at the peak.

Byte totals are over the captured events (all steps unless `step` is given);
peak_contribution_bytes is a snapshot at the run's peak; param_bytes is static.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from profiler.analysis.columns import codes_of, int_column
from profiler.analysis.live import Lifetimes, alive_at_peak, lifetimes
from profiler.trace.schema import Phase

SUMMED = (
    "forward_alloc_bytes",
    "backward_alloc_bytes",
    "recompute_alloc_bytes",
    "retained_bytes",
    "peak_contribution_bytes",
    "param_bytes",
    "buffer_bytes",
)
TABLE_COLUMNS = ("module", "parent", "class_name", "depth") + SUMMED


def _phase_run_end(phase_codes: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """For each event in idx, the index of the first later event in another phase (n if none).

    The same notion of a phase span as classify's activation rule, so that
    retained_bytes and the activation category agree.
    """
    change = np.flatnonzero(phase_codes[1:] != phase_codes[:-1]) + 1
    # A sentinel at n stands for "the phase never changes again".
    bounds = np.append(change, len(phase_codes))
    return bounds[np.searchsorted(change, idx, side="right")]


def _sum_by(keys: np.ndarray, values: np.ndarray, names: list) -> pd.Series:
    """int64 sums of `values` per dictionary code, indexed by name; null keys dropped."""
    ok = keys >= 0
    s = pd.Series(values[ok]).groupby(keys[ok]).sum()
    return pd.Series(s.to_numpy(np.int64), index=[names[i] for i in s.index], dtype=np.int64)


def _allocations(trace, lt: Lifetimes, step: int | None) -> dict[str, pd.Series]:
    ev = trace.events
    mod_codes, mod_names = codes_of(ev["module"])
    ph_codes, ph_names = codes_of(ev["phase"])
    idx = lt.alloc_index
    size = lt.size_bytes
    if step is not None:
        keep = int_column(ev, "step", fill=-1)[idx] == step
        idx, size, end = idx[keep], size[keep], lt.release_index[keep]
    else:
        end = lt.release_index
    run_end = _phase_run_end(ph_codes, idx)
    out = {}
    for column, phase in (
        ("forward_alloc_bytes", Phase.FORWARD),
        ("backward_alloc_bytes", Phase.BACKWARD),
        ("recompute_alloc_bytes", Phase.RECOMPUTE),
    ):
        code = ph_names.index(phase.value) if phase.value in ph_names else -2
        in_phase = ph_codes[idx] == code
        out[column] = _sum_by(mod_codes[idx][in_phase], size[in_phase], mod_names)
        if phase is Phase.FORWARD:
            kept = in_phase & (end >= run_end)  # still allocated when its forward span ended
            out["retained_bytes"] = _sum_by(mod_codes[idx][kept], size[kept], mod_names)
    return out


def module_table(trace, step: int | None = None, lt: Lifetimes | None = None, peak_only: bool = False) -> pd.DataFrame:
    """One row per module (from the modules table and from events), sorted by peak contribution.

    peak_only: leave the sums over the run (forward, backward, recompute, retained) at 0 and
    compute only the peak's contributions, a fraction of the cost on a long run.

    forward/backward/recompute_alloc_bytes: bytes allocated while the module ran in that phase.
    retained_bytes: forward allocations not yet freed (no free requested) when their forward
    span ended: the activations kept for backward.
    peak_contribution_bytes: bytes allocated at the peak (live_at's allocated set) that the module allocated.
    """
    lt = lt or lifetimes(trace)
    sums = {} if peak_only else _allocations(trace, lt, step)
    live = alive_at_peak(trace, lt)
    live = live[live["module"].notna()]
    sums["peak_contribution_bytes"] = live.groupby("module")["size_bytes"].sum().astype(np.int64)

    mods = trace.modules
    info = pd.DataFrame(
        {
            "module": mods["module"].astype(object).to_numpy() if len(mods) else [],
            "parent": mods["parent"].astype(object).to_numpy() if len(mods) else [],
            "class_name": mods["class_name"].astype(object).to_numpy() if len(mods) else [],
            "depth": int_column(mods, "depth", fill=-1),
            "param_bytes": int_column(mods, "param_bytes"),
            "buffer_bytes": int_column(mods, "buffer_bytes"),
        }
    ).drop_duplicates("module")
    names = list(dict.fromkeys(list(info["module"]) + [m for s in sums.values() for m in s.index]))
    table = pd.DataFrame({"module": names}).merge(info, on="module", how="left")
    _place_unknown(table)
    for column in SUMMED:
        src = sums.get(column)
        values = table["module"].map(src) if src is not None else table.get(column, pd.Series(0, index=table.index))
        table[column] = pd.Series(values).fillna(0).astype(np.int64).to_numpy()
    table["depth"] = table["depth"].astype(np.int64)
    table = table[list(TABLE_COLUMNS)]
    return table.sort_values(
        ["peak_contribution_bytes", "retained_bytes", "module"], ascending=[False, False, True], kind="stable"
    ).reset_index(drop=True)


def _place_unknown(table: pd.DataFrame) -> None:
    """Modules seen only in events: put them in the tree by their dotted path."""
    unknown = table["depth"].isna().to_numpy()
    if not unknown.any():
        return
    known = set(table["module"])
    depth_of = {m: d for m, d in zip(table["module"], table["depth"]) if not pd.isna(d)}
    # Shallow paths first, so that an unknown parent is placed before its children.
    for i in sorted(np.flatnonzero(unknown), key=lambda j: table.at[j, "module"].count(".")):
        module = table.at[i, "module"]
        parent = _dotted_parent(module, known)
        depth = depth_of[parent] + 1 if parent in depth_of else module.count(".")
        depth_of[module] = depth
        table.at[i, "parent"] = parent
        table.at[i, "depth"] = depth


def _dotted_parent(module: str, known: set) -> str | None:
    parts = module.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        parent = ".".join(parts[:cut])
        if parent in known:
            return parent
    # The root module's own name is the empty path, when the capture recorded one.
    return "" if module and "" in known else None


def _tree_depth(parent_pos: list[int]) -> np.ndarray:
    """Depth of each node by walking parents; a cycle in bad input stops at the repeat."""
    depth = np.full(len(parent_pos), -1, dtype=np.int64)
    for i in range(len(parent_pos)):
        chain, node = [], i
        while node >= 0 and depth[node] < 0 and node not in chain:
            chain.append(node)
            node = parent_pos[node]
        d = depth[node] if node >= 0 and depth[node] >= 0 else -1
        for j in reversed(chain):
            d += 1
            depth[j] = d
    return depth


def rollup(table: pd.DataFrame) -> pd.DataFrame:
    """Add subtree_<column> for every byte column: the module's own bytes plus its descendants'.

    Treemaps and icicles need a node's value to cover its children; the parent
    column links the tree. A parent missing from the table makes its child a root.
    """
    out = table.copy()
    pos = {m: i for i, m in enumerate(out["module"].tolist())}
    parent_pos = [pos.get(p, -1) if isinstance(p, str) else -1 for p in out["parent"]]
    parent_pos = [-1 if p == i else p for i, p in enumerate(parent_pos)]
    columns = [c for c in SUMMED if c in out]
    totals = {c: out[c].to_numpy(np.int64).copy() for c in columns}
    # Deepest first, so that each child's subtree is complete before it is added to its parent.
    for i in np.argsort(-_tree_depth(parent_pos), kind="stable"):
        p = parent_pos[i]
        if p >= 0:
            for c in columns:
                totals[c][p] += totals[c][i]
    for c in columns:
        out[f"subtree_{c}"] = totals[c]
    return out


PARTS_COLUMNS = ["id", "parent", "label", "bytes", "kind"]
NO_MODULE = "(in no module)"


def module_parts(rolled: pd.DataFrame, column: str, remainder: dict | None = None) -> pd.DataFrame:
    """id, parent, label, bytes, kind: rollup(table)'s `column` as a tree whose leaves add up.

    A module with children that holds bytes of its own gets a leaf for them (kind "itself",
    labelled "<Class>.forward itself": what its own forward computed, as a root's logits and
    loss), since a treemap would otherwise show them as an unlabelled gap; `remainder`
    (name -> bytes, e.g. the peak's bytes in no module, by category) adds NO_MODULE's leaves,
    so that with it the roots sum to the whole. kind: "module", "itself" or "remainder"."""
    value = f"subtree_{column}"
    d = rolled[rolled[value] > 0]
    known = set(d["module"])
    rows = []
    has_children = {p for p in d["parent"] if isinstance(p, str) and p in known}
    for m, parent, cls, own, total in zip(d["module"], d["parent"], d["class_name"], d[column], d[value]):
        node = m or "(root)"
        up = ("(root)" if parent == "" else parent) if isinstance(parent, str) and parent in known else ""
        rows.append([node, "" if up == node else up, node.rsplit(".", 1)[-1] or node, int(total), "module"])
        if node in has_children or (m in has_children):
            if own > 0:
                rows.append([f"{node} itself", node, f"{cls or node}.forward itself", int(own), "itself"])
    rest = {k: int(v) for k, v in (remainder or {}).items() if v}
    if rest:
        rows.append([NO_MODULE, "", NO_MODULE, sum(rest.values()), "remainder"])
        rows += [[f"{NO_MODULE}/{k}", NO_MODULE, str(k), v, "remainder"] for k, v in rest.items()]
    return pd.DataFrame(rows, columns=PARTS_COLUMNS)


def no_module_at_peak(trace, lt: Lifetimes | None = None) -> dict[str, int]:
    """category -> bytes alive at the peak that no module's forward or backward allocated
    (the optimizer's state, gradients made outside hooks, what the script allocated itself)."""
    live = alive_at_peak(trace, lt)
    rest = live[live["module"].isna()]
    if rest.empty:
        return {}
    by = rest.assign(category=rest["category"].astype(object).fillna("unknown")).groupby("category")["size_bytes"]
    return {str(k): int(v) for k, v in by.sum().sort_values(ascending=False).items()}
