"""From what the capture journals to the published tables.

During capture an event carries its raw allocation tag, the string that
`_set_memory_metadata` stamped on it ("phase|module|category"). Decoding the
tag and classifying happen here, once, over whole columns: the tag
dictionary holds a few hundred distinct strings however many events there are.
Used by the writer at finalize time and by the reader for unfinished runs.
"""

from __future__ import annotations

import sys

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from profiler.trace import schema
from profiler.trace.finalize import markers
from profiler.trace.finalize.blocks import AllocatorRules, BlockReplay, block_sizes
from profiler.trace.finalize.classify import CATEGORY_VALUES, classify_events
from profiler.trace.finalize.sites import hints_from_sites
from profiler.trace.finalize.templates import TemplateFill, fill_from_templates, phase_runs
from profiler.trace.schema import STR, Phase
from profiler.trace.tags import MARKER_PHASE, parse_tag


def _dict_column(arr: pa.ChunkedArray | pa.Array) -> pa.DictionaryArray:
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks() if arr.num_chunks != 1 else arr.chunk(0)
    if not pa.types.is_dictionary(arr.type):
        arr = pc.dictionary_encode(arr)
    return arr


def _codes(col: pa.ChunkedArray | pa.Array) -> tuple[list, np.ndarray]:
    """(the dictionary's values, per-event index into them with -1 for null) of a string column."""
    arr = _dict_column(col)
    return arr.dictionary.to_pylist(), arr.indices.fill_null(-1).to_numpy(zero_copy_only=False)


def _factorize(values: list) -> tuple[list, np.ndarray]:
    """(distinct non-null values, a code per input value with -1 for None, and a trailing -1)."""
    lut: dict = {}
    codes = [-1 if v is None else lut.setdefault(v, len(lut)) for v in values]
    return list(lut), np.array(codes + [-1], dtype=np.int64)


def _objects(values: list, codes: np.ndarray) -> np.ndarray:
    """Per-event object array: values[code], None for -1."""
    return np.array(values + [None], dtype=object)[codes]


def _tag_parts(tag) -> list[tuple[list, np.ndarray]]:
    """(distinct values, per-event codes) for phase, module and hint, decoded through the dictionary.

    Tags are parsed once per distinct tag, never once per event.
    """
    tags, idx = _codes(tag)
    parsed = [parse_tag(t) for t in tags]
    parts = []
    for part in range(3):
        values, code_of_tag = _factorize([p[part] for p in parsed])
        parts.append((values, code_of_tag[idx]))  # -1 (null tag) picks the trailing -1
    return parts


def _dict_array(codes: np.ndarray, values: list) -> pa.DictionaryArray:
    """The dictionary column of values[codes] (-1 is null), values in order of first appearance.

    The same array as dictionary-encoding the per-event strings, without making them.
    `values` must be distinct.
    """
    n, k = len(codes), len(values)
    slot = np.where(codes < 0, k, codes)
    first = np.full(k + 1, n, dtype=np.int64)
    np.minimum.at(first, slot, np.arange(n, dtype=np.int64))
    used = np.flatnonzero(first[:k] < n)
    order = used[np.argsort(first[used], kind="stable")]
    remap = np.full(k + 1, -1, dtype=np.int32)
    remap[order] = np.arange(len(order), dtype=np.int32)
    indices = remap[slot]
    null = indices < 0
    indices = pa.array(indices, pa.int32(), mask=null) if null.any() else pa.array(indices, pa.int32())
    dictionary = pa.array([values[i] for i in order.tolist()], pa.string())
    return pa.DictionaryArray.from_arrays(indices, dictionary)


def _encode(values: np.ndarray) -> pa.DictionaryArray:
    return pc.dictionary_encode(pa.array(values, pa.string())).cast(STR)


def _column_np(table: pa.Table, name: str, fill=0) -> np.ndarray:
    col = table.column(name)
    if col.null_count:
        col = pc.fill_null(col, fill)
    return col.to_numpy()


def _strings(table: pa.Table, name: str) -> np.ndarray:
    """Per-event object array of a string column, decoded through its dictionary.

    The strings are interned, so `== "alloc"` mostly finds the very same object.
    """
    values, idx = _codes(table.column(name))
    values = [sys.intern(v) if type(v) is str else v for v in values]
    return np.array(values + [None], dtype=object)[idx]


def _block_bytes(ev: pa.Table, action: np.ndarray, start: pa.Table, meta: dict, facts: dict) -> pa.Array:
    """Block sizes per event: replayed on CUDA, the storage size itself on CPU."""
    if meta.get("backend") == "cpu" or not ev.num_rows:
        return ev.column("size_bytes")
    replay = BlockReplay(AllocatorRules.from_settings(meta.get("allocator_settings")))
    if start.num_rows:
        cols = [
            start.column(c).to_pylist()
            for c in ("segment_addr", "segment_bytes", "segment_type", "block_addr", "block_bytes", "state")
        ]
        replay.load_segments(zip(*cols))
    sizes = block_sizes(action.tolist(), _pylist(ev.column("addr")), _pylist(ev.column("size_bytes")), replay)
    facts["block_replay_misses"] = replay.misses
    return pa.array(sizes, pa.int64())


def _pylist(col: pa.ChunkedArray) -> list:
    """Python values of an integer column (None for nulls); through numpy, which is faster."""
    if col.null_count:
        return col.to_pylist()
    return col.to_numpy().tolist()


def _fill_markers(phase: np.ndarray) -> np.ndarray:
    """Phase per event with marker events taking the phase of the event before them."""
    is_marker = phase == MARKER_PHASE
    if not is_marker.any():
        return phase
    idx = np.where(is_marker, 0, np.arange(len(phase)))
    np.maximum.accumulate(idx, out=idx)
    filled = phase[idx]  # a new array: fancy indexing copies
    filled[filled == MARKER_PHASE] = None
    return filled


# Phases that module hooks decide; without hooks, "backward" lingers past its end.
_HOOK_PHASES = (None, Phase.FORWARD.value, Phase.BACKWARD.value, Phase.RECOMPUTE.value)


def _hooked_steps(steps: pa.Table) -> set[int] | None:
    """Steps whose module hooks ran; None when every step was hooked."""
    if not steps.num_rows or "modules_hooked" not in steps.column_names:
        return None
    flags = steps.column("modules_hooked").to_pylist()
    if all(f is None or f for f in flags):
        return None
    return {int(s) for s, f in zip(steps.column("step").to_pylist(), flags) if f is None or f}


def finalize_tables(
    raw: dict[str, pa.Table], meta: dict | None = None, facts: dict | None = None
) -> dict[str, pa.Table]:
    """Raw journal tables in, published tables (schema.TABLES) out.

    `facts` (if given) receives what finalizing learned, such as block replay misses.
    """
    meta = meta or {}
    facts = facts if facts is not None else {}
    raw = dict(raw)
    # CUDA streams carry step markers: resolve steps and role positions first.
    raw["events"], raw["roles"] = markers.resolve(raw["events"], raw["roles"])
    ev = raw["events"]
    action = _strings(ev, "action") if ev.num_rows else np.array([], object)
    parts, fill = _event_tags(ev, action, raw["steps"])
    (phase_values, phase_codes), (module_values, module_codes), (hint_values, hint_codes) = parts
    if ev.num_rows:  # categories that allocation sites imply (transformers' cache code)
        stack = _column_np(ev, "stack_id", fill=-1)
        hint_values, hint_codes = hints_from_sites(stack, hint_values, hint_codes, raw["frames"], raw["stacks"])
    if fill is not None:
        facts.update(fill.counts())
        # The tail after the last completed step (teardown) is no step the script ran: no spans.
        completed = meta.get("steps_completed")
        spans_for = {s for s in fill.filled_steps if not isinstance(completed, int) or s < completed}
        raw["phases"] = _phases_with_templates(raw["phases"], ev, spans_for, phase_values, phase_codes)
    segments = raw["segments"]
    start = _start_snapshot(segments)
    block_bytes = _block_bytes(ev, action, start, meta, facts)
    baseline_addr = _baseline_addresses(start)

    phase = _objects(phase_values, phase_codes)
    # Markers sit inside phases without ending them: classify as if they were absent.
    span_phase = _fill_markers(phase) if MARKER_PHASE in phase_values else phase
    if MARKER_PHASE in phase_values:  # published as no phase
        phase_codes = np.where(phase_codes == phase_values.index(MARKER_PHASE), -1, phase_codes)
    codes, baseline_codes = _classify(
        ev, action, span_phase, _objects(hint_values, hint_codes), raw["roles"], baseline_addr
    )
    events = pa.table(
        {
            "ts_us": ev.column("ts_us"),
            "action": ev.column("action"),
            "addr": ev.column("addr"),
            "size_bytes": ev.column("size_bytes"),
            "block_bytes": block_bytes,
            "stream": ev.column("stream"),
            "step": ev.column("step"),
            "module": _dict_array(module_codes, module_values),
            "phase": _dict_array(phase_codes, phase_values),
            "category": _dict_array(codes, CATEGORY_VALUES),  # -1: no category
            "stack_id": ev.column("stack_id"),
        },
        schema=schema.TABLES["events"],
    )
    cat_values = np.array(CATEGORY_VALUES + [None], dtype=object)
    out = {"events": events, "segments": _segment_categories(segments, baseline_addr, cat_values[baseline_codes])}
    for name in schema.TABLE_NAMES:
        if name not in out:
            out[name] = raw[name].cast(schema.TABLES[name]) if raw[name].num_rows else schema.empty_table(name)
    return out


def _start_snapshot(segments: pa.Table) -> pa.Table:
    """The rows of the segment map taken when capture started."""
    if not segments.num_rows:
        return segments
    return segments.filter(pc.equal(segments.column("snapshot"), schema.SnapshotKind.START.value))


def _baseline_addresses(start: pa.Table) -> np.ndarray:
    """Addresses of the blocks already allocated when capture started."""
    if not start.num_rows:
        return np.array([], np.int64)
    start_live = start.filter(pc.equal(start.column("state"), schema.BlockState.ACTIVE_ALLOCATED.value))
    return _column_np(start_live, "block_addr") if start_live.num_rows else np.array([], np.int64)


def _event_tags(ev: pa.Table, action: np.ndarray, steps: pa.Table) -> tuple[list, TemplateFill | None]:
    """(values, per-event codes) of phase, module and hint, with unhooked steps filled from
    templates; and what filling did (None when every step was hooked)."""
    if not ev.num_rows:
        return [([], np.array([], np.int64)) for _ in range(3)], None
    parts = _tag_parts(ev.column("tag"))
    hooked = _hooked_steps(steps)
    if hooked is None:
        return parts, None
    # Steps captured without module hooks borrow them from a hooked step.
    (phase_values, phase_codes), (module_values, module_codes), (hint_values, hint_codes) = [
        (values, np.array(codes, copy=True)) for values, codes in parts
    ]
    # Phases the capture sets without module hooks, and that do not linger into a forward.
    own = [i for i, v in enumerate(phase_values) if v not in _HOOK_PHASES]
    marker = phase_values.index(MARKER_PHASE) if MARKER_PHASE in phase_values else -2
    fill = fill_from_templates(
        step=_column_np(ev, "step"),
        action=action,
        size=_column_np(ev, "size_bytes"),
        stack=_column_np(ev, "stack_id", fill=-1),
        addr=_column_np(ev, "addr"),
        hooked_steps=hooked,
        module=module_codes,
        phase=phase_codes,
        hint=hint_codes,
        phase_kept=np.isin(phase_codes, own),
        skip=phase_codes == marker,
    )
    return [(phase_values, phase_codes), (module_values, module_codes), (hint_values, hint_codes)], fill


def _phases_with_templates(
    phases: pa.Table, ev: pa.Table, filled: set[int], phase_values: list, phase_codes: np.ndarray
) -> pa.Table:
    """The phases table with the forward, backward and recompute spans of template-filled steps
    rebuilt from their events' phases (the capture saw no forward there, only a long backward)."""
    if not filled:
        return phases
    hook_codes = [i for i, v in enumerate(phase_values) if v in _HOOK_PHASES]
    marker = phase_values.index(MARKER_PHASE) if MARKER_PHASE in phase_values else -2
    step, code, start, end = phase_runs(
        _column_np(ev, "step"),
        _column_np(ev, "ts_us"),
        phase_codes,
        emit=np.isin(phase_codes, hook_codes),
        considered=(phase_codes != marker) & (phase_codes >= 0),  # events with no phase split no span
        steps=filled,
    )
    rows = pa.table(
        {
            "step": pa.array(step, pa.int32()),
            "phase": pa.array([phase_values[c] for c in code.tolist()], pa.string()),
            "ts_us_start": pa.array(start, pa.int64()),
            "ts_us_end": pa.array(end, pa.int64()),
        }
    )
    if phases.num_rows:
        kept = [
            not (s in filled and p in _HOOK_PHASES)
            for s, p in zip(phases.column("step").to_pylist(), phases.column("phase").to_pylist())
        ]
        phases = phases.filter(pa.array(kept)).select(rows.column_names).cast(rows.schema)
        rows = pa.concat_tables([phases, rows])
    return rows.take(pc.sort_indices(rows, [("ts_us_start", "ascending")]))


def _classify(
    ev: pa.Table, action: np.ndarray, phase: np.ndarray, hint: np.ndarray, roles: pa.Table, baseline_addr: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """classify_events over the decoded columns: category codes of events and of baseline blocks."""
    return classify_events(
        action=action,
        addr=_column_np(ev, "addr"),
        phase=phase,
        hint=hint,
        role_addr=_column_np(roles, "addr") if roles.num_rows else np.array([], np.int64),
        role_index=_column_np(roles, "event_index") if roles.num_rows else np.array([], np.int64),
        role_name=[str(r) for r in roles.column("role").to_pylist()] if roles.num_rows else [],
        baseline_addr=baseline_addr,
    )


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
    segments = segments.set_column(
        segments.schema.get_field_index("category"), "category", _encode(np.array(cats, dtype=object))
    )
    return segments.cast(schema.TABLES["segments"])
