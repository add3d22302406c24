"""From what the capture journals to the published tables.

During capture an event carries its raw allocation tag, the string that
`_set_memory_metadata` stamped on it ("phase|module|category"). Decoding the
tag and classifying happen here, once, over whole columns: the tag
dictionary holds a few hundred distinct strings however many events there are.
Used by the writer at finalize time and by the reader for unfinished runs.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from profiler import schema
from profiler.blocks import AllocatorRules, BlockReplay, block_sizes
from profiler.classify import CATEGORY_VALUES, classify_events

_STR = pa.dictionary(pa.int32(), pa.string())

RAW_EVENTS = pa.schema(
    [
        ("ts_us", pa.int64()),
        ("action", _STR),
        ("addr", pa.int64()),
        ("size_bytes", pa.int64()),
        ("stream", pa.int64()),
        ("step", pa.int32()),
        ("tag", _STR),  # "phase|module|category", any part may be empty
        ("stack_id", pa.int32()),
    ]
)

TAG_SEP = "|"


def make_tag(phase: str | None, module: str | None, category: str | None = None) -> str:
    return f"{phase or ''}{TAG_SEP}{module or ''}{TAG_SEP}{category or ''}"


def parse_tag(tag: str | None) -> tuple[str | None, str | None, str | None]:
    if not tag:
        return None, None, None
    parts = tag.split(TAG_SEP)
    parts += [""] * (3 - len(parts))
    return parts[0] or None, parts[1] or None, parts[2] or None


def _dict_column(arr: pa.ChunkedArray | pa.Array) -> pa.DictionaryArray:
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks() if arr.num_chunks != 1 else arr.chunk(0)
    if not pa.types.is_dictionary(arr.type):
        arr = pc.dictionary_encode(arr)
    return arr


def _decode_tags(tag: pa.Array) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-event object arrays (phase, module, hint), decoded through the dictionary."""
    tag = _dict_column(tag)
    parsed = [parse_tag(t) for t in tag.dictionary.to_pylist()]
    idx = tag.indices.fill_null(-1).to_numpy(zero_copy_only=False)
    cols = []
    for part in range(3):
        values = np.array([p[part] for p in parsed] + [None], dtype=object)
        cols.append(values[idx])  # -1 picks the trailing None
    return cols[0], cols[1], cols[2]


def _encode(values: np.ndarray) -> pa.DictionaryArray:
    return pc.dictionary_encode(pa.array(values, pa.string())).cast(_STR)


def _column_np(table: pa.Table, name: str, fill=0) -> np.ndarray:
    col = table.column(name)
    if col.null_count:
        col = pc.fill_null(col, fill)
    return col.to_numpy()


def _strings(table: pa.Table, name: str) -> np.ndarray:
    return np.array(table.column(name).to_pylist(), dtype=object)


def _block_bytes(ev: pa.Table, action: np.ndarray, start: pa.Table, meta: dict,
                 facts: dict) -> pa.Array:
    """Block sizes per event: replayed on CUDA, the storage size itself on CPU."""
    if meta.get("backend") == "cpu" or not ev.num_rows:
        return ev.column("size_bytes")
    replay = BlockReplay(AllocatorRules.from_settings(meta.get("allocator_settings")))
    if start.num_rows:
        cols = [start.column(c).to_pylist() for c in
                ("segment_addr", "segment_bytes", "segment_type", "block_addr", "block_bytes", "state")]
        replay.load_segments(zip(*cols))
    sizes = block_sizes(action.tolist(), ev.column("addr").to_pylist(),
                        ev.column("size_bytes").to_pylist(), replay)
    facts["block_replay_misses"] = replay.misses
    return pa.array(sizes, pa.int64())


def finalize_tables(raw: dict[str, pa.Table], meta: dict | None = None,
                    facts: dict | None = None) -> dict[str, pa.Table]:
    """Raw journal tables in, published tables (schema.TABLES) out.

    `facts` (if given) receives what finalizing learned, such as block replay misses.
    """
    meta = meta or {}
    facts = facts if facts is not None else {}
    ev = raw["events"]
    phase, module, hint = _decode_tags(ev.column("tag")) if ev.num_rows else (
        np.array([], object), np.array([], object), np.array([], object))
    action = _strings(ev, "action") if ev.num_rows else np.array([], object)
    addr = _column_np(ev, "addr")

    segments = raw["segments"]
    start = segments.filter(pc.equal(segments.column("snapshot"), schema.SnapshotKind.START.value)) \
        if segments.num_rows else segments
    block_bytes = _block_bytes(ev, action, start, meta, facts)
    start_live = start.filter(pc.equal(start.column("state"), schema.BlockState.ACTIVE_ALLOCATED.value)) \
        if start.num_rows else start
    baseline_addr = _column_np(start_live, "block_addr") if start_live.num_rows else np.array([], np.int64)

    roles = raw["roles"]
    codes, baseline_codes = classify_events(
        action=action, addr=addr, phase=phase, hint=hint,
        role_addr=_column_np(roles, "addr") if roles.num_rows else np.array([], np.int64),
        role_index=_column_np(roles, "event_index") if roles.num_rows else np.array([], np.int64),
        role_name=[str(r) for r in roles.column("role").to_pylist()] if roles.num_rows else [],
        baseline_addr=baseline_addr,
    )
    cat_values = np.array(CATEGORY_VALUES + [None], dtype=object)
    category = cat_values[codes]  # -1 (no category) picks None

    events = pa.table(
        {
            "ts_us": ev.column("ts_us"),
            "action": ev.column("action"),
            "addr": ev.column("addr"),
            "size_bytes": ev.column("size_bytes"),
            "block_bytes": block_bytes,
            "stream": ev.column("stream"),
            "step": ev.column("step"),
            "module": _encode(module),
            "phase": _encode(phase),
            "category": _encode(category),
            "stack_id": ev.column("stack_id"),
        },
        schema=schema.TABLES["events"],
    )
    out = {"events": events}
    out["segments"] = _segment_categories(segments, baseline_addr, cat_values[baseline_codes])
    for name in schema.TABLE_NAMES:
        if name not in out:
            out[name] = raw[name].cast(schema.TABLES[name]) if raw[name].num_rows else \
                schema.empty_table(name)
    return out


def _segment_categories(segments: pa.Table, baseline_addr, baseline_cat) -> pa.Table:
    """Fill the start snapshot's live blocks with their categories."""
    if not segments.num_rows:
        return schema.empty_table("segments")
    lookup = dict(zip(baseline_addr.tolist(), baseline_cat.tolist()))
    snap = segments.column("snapshot").to_pylist()
    state = segments.column("state").to_pylist()
    block = segments.column("block_addr").to_pylist()
    existing = segments.column("category").to_pylist()
    cats = [
        lookup.get(b) if s == schema.SnapshotKind.START.value and st == "active_allocated" else e
        for s, st, b, e in zip(snap, state, block, existing)
    ]
    segments = segments.set_column(segments.schema.get_field_index("category"), "category",
                                   _encode(np.array(cats, dtype=object)))
    return segments.cast(schema.TABLES["segments"])
