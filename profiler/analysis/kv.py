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
