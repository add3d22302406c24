"""Categories read from where an allocation was made.

Some code allocates one kind of memory only. What transformers' caches allocate in their
`update` (the tensors a layer cache grows by torch.cat, a layer's lazy initialization) and
`early_initialization` (the zeros a static cache preallocates), all in
`transformers/cache_utils.py`, is KV cache state. So an allocation whose Python stack passes
through one of those functions there is kv_cache, the same as if the capture had stamped the
hint around the call. (Not the whole file: a static layer's constructor makes a position
counter, which is no K or V.) Where events carry stacks,
the capture therefore leaves the hint out of its wrapper of Cache.update (profiler/capture/
hf_cache.py), which runs once per layer per token. A hint stamped in the tag still wins: this
rule fills only events with none.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from profiler.trace.schema import Category

# (file suffix, functions, category): a frame of one of those functions in such a file makes
# the allocation that category.
SITE_CATEGORIES = (("transformers/cache_utils.py", ("update", "early_initialization"), Category.KV_CACHE.value),)


def stacks_through(frames: pa.Table, stacks: pa.Table, suffix: str, functions: tuple[str, ...]) -> np.ndarray:
    """Ids of the stacks with a frame of one of `functions` in a file whose path ends with `suffix`."""
    if not frames.num_rows or not stacks.num_rows:
        return np.array([], np.int64)
    files = pc.replace_substring(frames.column("filename").combine_chunks(), "\\", "/")
    site = pc.and_(pc.ends_with(files, suffix), pc.is_in(frames.column("function"), pa.array(functions)))
    hit = frames.column("frame_id").filter(pc.fill_null(site, False)).to_numpy()
    if not len(hit):
        return np.array([], np.int64)
    lists = stacks.column("frame_ids").combine_chunks()
    inside = np.isin(pc.list_flatten(lists).to_numpy(), hit)
    owner = pc.list_parent_indices(lists).to_numpy()
    return np.unique(stacks.column("stack_id").to_numpy()[owner[inside]]).astype(np.int64)


def hints_from_sites(
    stack_id: np.ndarray, hint_values: list, hint_codes: np.ndarray, frames: pa.Table, stacks: pa.Table
) -> tuple[list, np.ndarray]:
    """(hint values, per-event hint codes) with SITE_CATEGORIES filled in where an event has
    no hint and its stack (`stack_id`, -1 for none) passes through such a site."""
    for suffix, functions, category in SITE_CATEGORIES:
        found = stacks_through(frames, stacks, suffix, functions)
        if not len(found):
            continue
        fill = (hint_codes == -1) & np.isin(stack_id, found)
        if not fill.any():
            continue
        if category not in hint_values:
            hint_values = [*hint_values, category]
        hint_codes = np.where(fill, hint_values.index(category), hint_codes)
    return hint_values, hint_codes
