"""The trace format: every table, column and enumerated value, defined once.

A run is one directory:

    meta.json            run-level facts (see META_REQUIRED)
    events.parquet       one row per allocator event
    steps.parquet        one row per step boundary, with memory_stats() counters
    phases.parquet       one row per phase span (forward, backward, ...)
    modules.parquet      the module tree with parameter and buffer bytes
    roles.parquet        tensors whose role is known at a moment (parameter, gradient, ...)
    segments.parquet     allocator segment/block snapshots (at start, on OOM, at the end)
    kv.parquet           KV-cache growth: tokens, token-state and reserved bytes per step
    frames.parquet       interned stack frames
    stacks.parquet       interned stacks: a list of frame ids, innermost first

While a capture runs, each table is appended to `<table>.journal` (an Arrow IPC
stream, so a killed process leaves a readable prefix); finalizing turns each
journal into `<table>.parquet` with an atomic rename.
"""

from __future__ import annotations

import enum

import pyarrow as pa

SCHEMA_VERSION = 1
FORMAT_NAME = "vramscope-trace"


class Action(str, enum.Enum):
    """Allocator event kinds, in torch's own words."""

    ALLOC = "alloc"
    FREE_REQUESTED = "free_requested"
    FREE_COMPLETED = "free_completed"
    SEGMENT_ALLOC = "segment_alloc"
    SEGMENT_FREE = "segment_free"
    SEGMENT_MAP = "segment_map"
    SEGMENT_UNMAP = "segment_unmap"
    OOM = "oom"
    SNAPSHOT = "snapshot"


class Phase(str, enum.Enum):
    """Built-in phases. User phases from profiler.mark() are free strings."""

    FORWARD = "forward"
    BACKWARD = "backward"
    RECOMPUTE = "recompute"
    OPTIMIZER = "optimizer"


class Category(str, enum.Enum):
    # Under FSDP, PARAMETER and GRADIENT are this rank's shards; the full tensors
    # that exist only around a layer's forward or backward have their own categories.
    PARAMETER = "parameter"
    GRADIENT = "gradient"
    OPTIMIZER_STATE = "optimizer_state"
    ACTIVATION = "activation"
    TEMPORARY = "temporary"
    KV_CACHE = "kv_cache"
    UNSHARDED_PARAMETER = "unsharded_parameter"  # a layer's all-gathered parameters
    UNSHARDED_GRADIENT = "unsharded_gradient"  # full gradients before the reduce-scatter
    ALL_GATHER = "all_gather"  # all-gather input and output buffers
    REDUCE_SCATTER = "reduce_scatter"  # reduce-scatter input buffers
    OTHER = "other"


class Backend(str, enum.Enum):
    CUDA = "cuda"
    CPU = "cpu"


class Status(str, enum.Enum):
    COMPLETE = "complete"
    OOM = "oom"
    ERROR = "error"


class BlockState(str, enum.Enum):
    ACTIVE_ALLOCATED = "active_allocated"
    ACTIVE_PENDING_FREE = "active_pending_free"
    INACTIVE = "inactive"


class SnapshotKind(str, enum.Enum):
    START = "start"
    OOM = "oom"
    END = "end"


# Roles a tensor can be registered with; they become categories offline.
ROLES = (
    Category.PARAMETER.value,
    Category.GRADIENT.value,
    Category.OPTIMIZER_STATE.value,
    Category.KV_CACHE.value,
    Category.UNSHARDED_GRADIENT.value,
    "buffer",
)

STR = pa.dictionary(pa.int32(), pa.string())

# The events journal as the capture writes it: the raw tag, before finalize splits it
# into module, phase and category and adds block_bytes.
RAW_EVENTS = pa.schema(
    [
        ("ts_us", pa.int64()),
        ("action", STR),
        ("addr", pa.int64()),
        ("size_bytes", pa.int64()),
        ("stream", pa.int64()),
        ("step", pa.int32()),
        ("tag", STR),  # "phase|module|category" (profiler.trace.tags), any part may be empty
        ("stack_id", pa.int32()),
    ]
)

TABLES: dict[str, pa.Schema] = {
    "events": pa.schema(
        [
            ("ts_us", pa.int64()),
            ("action", STR),
            ("addr", pa.int64()),
            ("size_bytes", pa.int64()),  # requested bytes, as torch records them
            # Bytes of the allocator block (what memory_allocated() counts):
            # requests rounded up, and large blocks sometimes handed out unsplit.
            ("block_bytes", pa.int64()),
            ("stream", pa.int64()),
            ("step", pa.int32()),
            ("module", STR),
            ("phase", STR),
            ("category", STR),
            ("stack_id", pa.int32()),
        ]
    ),
    "steps": pa.schema(
        [
            ("step", pa.int32()),
            ("ts_us", pa.int64()),  # when the step ended
            ("allocated_bytes", pa.int64()),
            ("reserved_bytes", pa.int64()),  # null on CPU
            ("active_bytes", pa.int64()),
            ("inactive_split_bytes", pa.int64()),  # null on CPU
            ("max_allocated_bytes", pa.int64()),  # peak since capture start
            ("max_reserved_bytes", pa.int64()),  # null on CPU
            ("num_alloc_retries", pa.int64()),  # null on CPU
            ("num_ooms", pa.int64()),  # null on CPU
            ("events_seen", pa.int64()),  # cumulative, this capture
            ("events_dropped", pa.int64()),  # cumulative, this capture
            # Whether module hooks ran in this step; when they did not, modules and
            # phases come from an identical hooked step (profiler/trace/finalize/templates.py).
            ("modules_hooked", pa.bool_()),
        ]
    ),
    "phases": pa.schema(
        [
            ("step", pa.int32()),
            ("phase", STR),
            ("ts_us_start", pa.int64()),
            ("ts_us_end", pa.int64()),
        ]
    ),
    "modules": pa.schema(
        [
            ("module", pa.string()),
            ("parent", pa.string()),  # null for a root
            ("class_name", pa.string()),
            ("depth", pa.int32()),
            ("param_bytes", pa.int64()),  # own parameters, not children's
            ("buffer_bytes", pa.int64()),
            ("param_count", pa.int64()),
        ]
    ),
    "roles": pa.schema(
        [
            ("ts_us", pa.int64()),
            # Events recorded before the role was registered: the role belongs to
            # the allocation at `addr` that is live at that point of the stream.
            ("event_index", pa.int64()),
            ("step", pa.int32()),
            ("addr", pa.int64()),
            ("size_bytes", pa.int64()),
            ("role", STR),
            ("name", STR),
        ]
    ),
    "segments": pa.schema(
        [
            ("snapshot", STR),  # SnapshotKind
            ("ts_us", pa.int64()),
            ("event_index", pa.int64()),  # events recorded before the snapshot
            ("segment_addr", pa.int64()),
            ("segment_bytes", pa.int64()),
            ("stream", pa.int64()),
            ("segment_type", STR),  # small | large
            ("is_expandable", pa.bool_()),
            ("block_addr", pa.int64()),
            ("block_bytes", pa.int64()),
            ("requested_bytes", pa.int64()),
            ("state", STR),  # BlockState
            ("category", STR),  # filled offline, like events.category
            ("stack_id", pa.int32()),
        ]
    ),
    "kv": pa.schema(
        [
            ("step", pa.int32()),
            ("ts_us", pa.int64()),
            ("cache", STR),  # a name for the cache (its class, or what the caller passed)
            ("batch", pa.int32()),
            ("tokens", pa.int64()),  # token positions held per sequence (max over the batch)
            ("token_state_bytes", pa.int64()),  # bytes holding real token states (K and V)
            ("reserved_bytes", pa.int64()),  # bytes the cache holds, used or not
            ("extra_bytes", pa.int64()),  # scales, block tables and other bookkeeping
        ]
    ),
    "frames": pa.schema(
        [
            ("frame_id", pa.int32()),
            ("filename", pa.string()),
            ("line", pa.int32()),
            ("function", pa.string()),
        ]
    ),
    "stacks": pa.schema(
        [
            ("stack_id", pa.int32()),
            ("frame_ids", pa.list_(pa.int32())),  # innermost first
        ]
    ),
}

# Columns a reader needs; a table missing any of these is rejected.
REQUIRED_COLUMNS: dict[str, tuple[str, ...]] = {
    "events": ("ts_us", "action", "addr", "size_bytes", "block_bytes", "stream", "step", "module", "phase",
               "category", "stack_id"),
    "steps": ("step", "ts_us", "allocated_bytes", "reserved_bytes", "max_allocated_bytes"),
    "phases": ("step", "phase", "ts_us_start", "ts_us_end"),
    "modules": ("module", "parent", "class_name", "depth", "param_bytes", "buffer_bytes"),
    "roles": ("ts_us", "event_index", "addr", "size_bytes", "role"),
    "segments": ("snapshot", "ts_us", "event_index", "segment_addr", "segment_bytes", "block_addr",
                 "block_bytes", "state"),
    "kv": ("step", "ts_us", "cache", "tokens", "token_state_bytes", "reserved_bytes"),
    "frames": ("frame_id", "filename", "line", "function"),
    "stacks": ("stack_id", "frame_ids"),
}

# Tables every finished trace has (possibly with zero rows).
TABLE_NAMES = tuple(TABLES)
# Tables added to version 1 after its first traces were written: absent means empty.
OPTIONAL_TABLES = ("kv",)

META_FILE = "meta.json"
META_REQUIRED = (
    "format",
    "schema_version",
    "run_id",
    "name",
    "backend",
    "device",
    "torch_version",
    "config",
    "allocator_settings",
    "baseline_allocated_bytes",
    "max_allocated_bytes",
    "max_reserved_bytes",
    "events_dropped",
)


def parquet_name(table: str) -> str:
    return f"{table}.parquet"


def journal_name(table: str) -> str:
    return f"{table}.journal"


def empty_table(table: str) -> pa.Table:
    return TABLES[table].empty_table()
