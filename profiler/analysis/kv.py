"""A run's KV cache against its tokens: bytes per token position and the bytes held for no token.

The trace's kv table has one row per cache and step: token positions (batch x tokens),
token_state_bytes (the K and V states those positions hold), reserved_bytes (what the
cache has allocated) and extra_bytes (scales, block tables and other bookkeeping).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

WASTE_COLUMNS = ["run", "cache", "token_state_bytes", "unused_bytes", "extra_bytes"]


def kv_table(trace) -> pd.DataFrame:
    """The run's kv rows with tokens_total (batch x tokens), unused bytes (reserved, holding no
    token's state) and extra bytes (0 where not recorded)."""
    kv = trace.kv.copy()
    if kv.empty:
        return kv
    kv["cache"] = kv["cache"].astype(str)
    batch = kv["batch"].fillna(1).astype(np.int64)
    kv["tokens_total"] = batch * kv["tokens"].astype(np.int64)
    kv["extra_bytes"] = kv["extra_bytes"].fillna(0).astype(np.int64)
    kv["unused_bytes"] = kv["reserved_bytes"].astype(np.int64) - kv["token_state_bytes"].astype(np.int64)
    return kv


def kv_token_bytes(kv: pd.DataFrame) -> float | None:
    """K+V bytes per token position, as the formula has them: the median of token-state bytes
    over batch x tokens (a cache that stores full-width states hits the formula exactly).
    None when no row holds a token."""
    ok = kv[kv["tokens_total"] > 0] if len(kv) else kv
    if ok.empty:
        return None
    return float(np.median(ok["token_state_bytes"] / ok["tokens_total"]))


def kv_waste(kvs: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Per run (the keys of `kvs`, each a kv_table) and cache: mean token-state, unused and
    extra bytes over its steps."""
    rows = []
    for name, kv in kvs.items():
        for cache, g in kv.groupby("cache", sort=True):
            rows.append(
                {
                    "run": name,
                    "cache": cache,
                    "token_state_bytes": float(g["token_state_bytes"].mean()),
                    "unused_bytes": float(g["unused_bytes"].mean()),
                    "extra_bytes": float(g["extra_bytes"].mean()),
                }
            )
    return pd.DataFrame(rows, columns=WASTE_COLUMNS)


SHAPE_KEYS = ("layers", "kv_heads", "head_dim", "dtype_bytes", "batch")
SUMMARY_COLUMNS = [
    "cache",
    "steps",
    "step",
    "batch",
    "tokens",
    "token_state_bytes",
    "reserved_bytes",
    "extra_bytes",
    "bytes_per_token",
    "shape",
    "formula_bytes",
    "formula_matches",
]

_SUMMARY_TYPES = {
    "cache": str,
    "steps": "int64",
    "step": "int64",
    "batch": "Int64",
    "tokens": "int64",
    "token_state_bytes": "int64",
    "reserved_bytes": "int64",
    "extra_bytes": "int64",
    "bytes_per_token": "float64",
    "formula_bytes": "Int64",
    "formula_matches": "boolean",
}


def kv_summary(kv: pd.DataFrame, shapes=None) -> pd.DataFrame:
    """Per cache of a kv_table: how many steps recorded it, its last row (step, batch, tokens,
    token-state, reserved and extra bytes), and K+V bytes per token position (kv_token_bytes).

    Where `shapes` (meta.json's kv_shapes: cache -> layers, kv_heads, head_dim, dtype_bytes,
    batch) knows the cache, `shape` holds those facts and `formula_bytes` the token-state bytes
    they imply at the last row's tokens, layers x 2 x tokens x kv_heads x head_dim x dtype_bytes
    x batch, and `formula_matches` whether the measured bytes equal it; else both are None."""
    rows: list[dict] = []
    for cache, g in kv.groupby("cache", sort=True):
        last = g.sort_values("step", kind="stable").iloc[-1]
        tokens = int(last["tokens"])
        shape = _shape(shapes, str(cache))
        formula = None
        if shape is not None:
            formula = shape["layers"] * 2 * tokens * shape["kv_heads"] * shape["head_dim"]
            formula *= shape["dtype_bytes"] * shape["batch"]
        rows.append(
            {
                "cache": str(cache),
                "steps": int(g["step"].nunique()),
                "step": int(last["step"]),
                "batch": int(last["batch"]) if pd.notna(last["batch"]) else None,
                "tokens": tokens,
                "token_state_bytes": int(last["token_state_bytes"]),
                "reserved_bytes": int(last["reserved_bytes"]),
                "extra_bytes": int(last["extra_bytes"]),
                "bytes_per_token": kv_token_bytes(g),
                "shape": shape,
                "formula_bytes": formula,
                "formula_matches": None if formula is None else formula == int(last["token_state_bytes"]),
            }
        )
    # Built as objects, then typed: missing counts are NA, and bytes never pass through a float.
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS, dtype=object).astype(_SUMMARY_TYPES)


def _shape(shapes, cache: str) -> dict | None:
    """The formula's facts for `cache`, if `shapes` holds all of them as non-negative ints."""
    s = shapes.get(cache) if isinstance(shapes, dict) else None
    if not isinstance(s, dict):
        return None
    facts = {k: s.get(k) for k in SHAPE_KEYS}
    ok = all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in facts.values())
    return facts if ok else None
