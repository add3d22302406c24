"""Categories from allocation sites (profiler/trace/finalize/sites.py): an allocation made inside
transformers' cache update is kv_cache, read from its stack, unless its tag names a category."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from profiler.trace import schema
from profiler.trace.finalize import tables
from profiler.trace.finalize.sites import stacks_through
from profiler.trace.tags import make_tag

CACHE = "/env/lib/python3.11/site-packages/transformers/cache_utils.py"
MODEL = "/env/lib/python3.11/site-packages/transformers/models/llama/modeling_llama.py"
# frame id: (file, function)
FRAMES = {
    0: (MODEL, "forward"),
    1: (CACHE, "update"),  # Cache.update
    2: (CACHE, "lazy_initialization"),
    3: (CACHE, "__init__"),  # a static layer's position counter: no K or V
    4: (CACHE.replace("/", "\\"), "early_initialization"),  # a Windows path
    5: (MODEL.replace("modeling_llama", "cache_utils_helpers"), "update"),  # another file
    6: (CACHE, None),  # a frame whose name is lost
}
# stack id: frame ids, innermost first
STACKS = {10: [0], 11: [1, 0], 12: [2, 1, 0], 13: [3, 0], 14: [4, 0], 15: [5, 0], 16: [6, 0]}


def _frames() -> pa.Table:
    ids = list(FRAMES)
    return pa.table(
        {
            "frame_id": ids,
            "filename": [FRAMES[i][0] for i in ids],
            "line": [1] * len(ids),
            "function": [FRAMES[i][1] for i in ids],
        },
        schema=schema.JOURNALS["frames"],
    )


def _stacks() -> pa.Table:
    return pa.table({"stack_id": list(STACKS), "frame_ids": list(STACKS.values())}, schema=schema.JOURNALS["stacks"])


def test_the_stacks_through_a_cache_update_or_preallocation_are_found():
    found = stacks_through(_frames(), _stacks(), "transformers/cache_utils.py", ("update", "early_initialization"))
    assert found.tolist() == [11, 12, 14]
    empty = schema.empty_journal("frames")
    assert stacks_through(empty, _stacks(), "transformers/cache_utils.py", ("update",)).tolist() == []


def test_finalize_reads_kv_cache_from_the_stack_unless_the_tag_names_a_category():
    forward, weights = make_tag("forward", "model.layers.0.self_attn"), make_tag("forward", None, "parameter")
    # (addr, stack id, tag); every block stays alive
    allocs = [
        (0x100, 10, forward),  # the model's own work
        (0x200, 11, forward),  # torch.cat in the update
        (0x300, 12, forward),  # the lazy initialization, below the update
        (0x400, 13, forward),  # the constructor's counter
        (0x500, 14, forward),  # the static cache's zeros
        (0x600, 11, weights),  # a category stamped by the user wins
        (0x700, None, forward),  # no stack
        (0x800, 15, forward),
        (0x900, 16, forward),
    ]
    n = len(allocs)
    raw = {t: schema.empty_journal(t) for t in schema.TABLE_NAMES}
    raw["events"] = pa.table(
        {
            "ts_us": list(range(n)),
            "action": ["alloc"] * n,
            "addr": [a for a, _, _ in allocs],
            "size_bytes": [64] * n,
            "stream": [0] * n,
            "step": [0] * n,
            "tag": [t for _, _, t in allocs],
            "stack_id": [s for _, s, _ in allocs],
        },
        schema=schema.RAW_EVENTS,
    )
    raw["frames"], raw["stacks"] = _frames(), _stacks()
    out = tables.finalize_tables(raw, {"backend": "cpu"})
    category = out["events"].column("category").to_pylist()
    kv = [a for (a, _, _), c in zip(allocs, category) if c == "kv_cache"]
    assert kv == [0x200, 0x300, 0x500]
    assert category[5] == "parameter"
    assert np.array(category)[[0, 3, 6, 7, 8]].tolist() == ["activation"] * 5  # outlive the forward
