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

Each table's columns are listed once, in COLUMNS; the pyarrow schemas (TABLES, JOURNALS,
RAW_EVENTS), the required columns and the reader's value checks are derived from them.
meta.json's keys are listed once, in META_KEYS.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

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
    # A category is one line here; one that tensors are registered with also needs its
    # ROLE_CATEGORIES entry below, one that roles override its classify.WEAK_HINTS entry.
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
    TERMINATED = "terminated"  # SIGTERM or SIGHUP ended the script (the capture finalized first)
    CAPTURE_FAILED = "capture_failed"  # the capture itself failed and stopped; the script ran on


class BlockState(str, enum.Enum):
    ACTIVE_ALLOCATED = "active_allocated"
    ACTIVE_PENDING_FREE = "active_pending_free"
    INACTIVE = "inactive"


class SnapshotKind(str, enum.Enum):
    START = "start"
    OOM = "oom"
    END = "end"


# Roles a tensor can be registered with, and the category each becomes offline; when
# several roles name one allocation, the first here wins.
ROLE_CATEGORIES: dict[str, Category] = {
    Category.PARAMETER.value: Category.PARAMETER,
    "buffer": Category.PARAMETER,  # module state; the docs say so
    Category.OPTIMIZER_STATE.value: Category.OPTIMIZER_STATE,
    Category.GRADIENT.value: Category.GRADIENT,
    Category.KV_CACHE.value: Category.KV_CACHE,
    Category.UNSHARDED_GRADIENT.value: Category.UNSHARDED_GRADIENT,
}
ROLES = tuple(ROLE_CATEGORIES)

STR = pa.dictionary(pa.int32(), pa.string())
I32, I64 = pa.int32(), pa.int64()


@dataclass(frozen=True)
class Column:
    """One column of a table, and what a reader demands of it.

    required: a table without this column is rejected (an optional one is read as nulls).
    non_negative: byte counts, which analysis would silently mis-sum if negative.
    not_null: every row must fill it.
    non_decreasing: the value never goes down from one row to the next.
    journal / published: where the column exists. The events journal holds the raw tag,
    which finalize splits into module, phase and category (adding block_bytes).
    journal_required: whether a journal must hold it, where that differs from `required`.
    """

    name: str
    type: pa.DataType
    doc: str = ""
    required: bool = True
    non_negative: bool = False
    not_null: bool = False
    non_decreasing: bool = False
    journal: bool = True
    published: bool = True
    journal_required: bool | None = None

    def required_in(self, journal: bool) -> bool:
        if journal and self.journal_required is not None:
            return self.journal_required
        return self.required


C = Column
COLUMNS: dict[str, tuple[Column, ...]] = {
    "events": (
        C("ts_us", I64),
        C("action", STR, "Action", not_null=True),
        C("addr", I64),
        C("size_bytes", I64, "requested bytes, as torch records them", non_negative=True, not_null=True),
        C(
            "block_bytes",
            I64,
            "bytes of the allocator block (what memory_allocated() counts): requests "
            "rounded up, and large blocks sometimes handed out unsplit",
            non_negative=True,
            journal=False,
        ),
        C("stream", I64, journal_required=False),
        C("step", I32),
        C("module", STR, journal=False),
        C("phase", STR, journal=False),
        C("category", STR, "Category", journal=False),
        C("tag", STR, '"phase|module|category" (profiler.trace.tags), any part may be empty', published=False),
        C("stack_id", I32, journal_required=False),
    ),
    "steps": (
        C("step", I32, not_null=True, non_decreasing=True),
        C("ts_us", I64, "when the step ended"),
        C("allocated_bytes", I64, non_negative=True),
        C("reserved_bytes", I64, "null on CPU", non_negative=True),
        C("active_bytes", I64, required=False, non_negative=True),
        C("inactive_split_bytes", I64, "null on CPU", required=False),
        C("max_allocated_bytes", I64, "peak since capture start", non_negative=True),
        C("max_reserved_bytes", I64, "null on CPU", required=False, non_negative=True),
        C("num_alloc_retries", I64, "null on CPU", required=False),
        C("num_ooms", I64, "null on CPU", required=False),
        C("events_seen", I64, "cumulative, this capture", required=False),
        C("events_dropped", I64, "cumulative, this capture", required=False),
        C(
            "modules_hooked",
            pa.bool_(),
            "whether module hooks ran in this step; when they did not, "
            "modules and phases come from a hooked step (finalize/templates.py)",
            required=False,
        ),
    ),
    "phases": (
        C("step", I32),
        C("phase", STR),
        C("ts_us_start", I64),
        C("ts_us_end", I64),
    ),
    "modules": (
        C("module", pa.string()),
        C("parent", pa.string(), "null for a root"),
        C("class_name", pa.string()),
        C("depth", I32),
        C("param_bytes", I64, "own parameters, not children's", non_negative=True),
        C("buffer_bytes", I64, non_negative=True),
        C("param_count", I64, required=False),
    ),
    "roles": (
        C("ts_us", I64),
        C(
            "event_index",
            I64,
            "events recorded before the role was registered: the role belongs "
            "to the allocation at `addr` that is live at that point of the stream",
        ),
        C("step", I32, required=False),
        C("addr", I64),
        C("size_bytes", I64, non_negative=True),
        C("role", STR, "one of ROLES"),
        C("name", STR, required=False),
    ),
    "segments": (
        C("snapshot", STR, "SnapshotKind"),
        C("ts_us", I64),
        C("event_index", I64, "events recorded before the snapshot"),
        C("segment_addr", I64),
        C("segment_bytes", I64, non_negative=True),
        C("stream", I64, required=False),
        C("segment_type", STR, "small | large", required=False),
        C("is_expandable", pa.bool_(), required=False),
        C(
            "segment_pool",
            STR,
            'torch\'s segment_pool_id as "a,b": "0,0" is the default pool, any other a private pool'
            " (CUDA graphs, MemPool)",
            required=False,
        ),
        C("block_addr", I64),
        C("block_bytes", I64, non_negative=True),
        C("requested_bytes", I64, required=False),
        C("state", STR, "BlockState"),
        C("category", STR, "filled offline, like events.category", required=False),
        C("stack_id", I32, required=False),
    ),
    "kv": (
        C("step", I32),
        C("ts_us", I64),
        C("cache", STR, "a name for the cache (its class, or what the caller passed)"),
        C("batch", I32, required=False),
        C("tokens", I64, "token positions held per sequence (max over the batch)"),
        C("token_state_bytes", I64, "bytes holding real token states (K and V)"),
        C("reserved_bytes", I64, "bytes the cache holds, used or not"),
        C("extra_bytes", I64, "scales, block tables and other bookkeeping", required=False),
    ),
    "frames": (
        C("frame_id", I32),
        C("filename", pa.string()),
        C("line", I32),
        C("function", pa.string()),
    ),
    "stacks": (
        C("stack_id", I32),
        C("frame_ids", pa.list_(I32), "innermost first"),
    ),
}
del C


def _schema(columns) -> pa.Schema:
    return pa.schema([(c.name, c.type) for c in columns])


def journal_columns(table: str) -> tuple[Column, ...]:
    """The columns of `table` as the capture journals them."""
    return tuple(c for c in COLUMNS[table] if c.journal)


def published_columns(table: str) -> tuple[Column, ...]:
    """The columns of `table` as a finished trace publishes them."""
    return tuple(c for c in COLUMNS[table] if c.published)


# The published tables, as finalize writes them and the reader returns them.
TABLES: dict[str, pa.Schema] = {t: _schema(published_columns(t)) for t in COLUMNS}
# The journals as the capture writes them; only events differs from its published table.
JOURNALS: dict[str, pa.Schema] = {t: _schema(journal_columns(t)) for t in COLUMNS}
RAW_EVENTS = JOURNALS["events"]

# Columns a reader needs; a table missing any of these is rejected.
REQUIRED_COLUMNS: dict[str, tuple[str, ...]] = {
    t: tuple(c.name for c in published_columns(t) if c.required_in(journal=False)) for t in COLUMNS
}
JOURNAL_REQUIRED_COLUMNS: dict[str, tuple[str, ...]] = {
    t: tuple(c.name for c in journal_columns(t) if c.required_in(journal=True)) for t in COLUMNS
}


def _flagged(flag: str) -> dict[str, tuple[str, ...]]:
    found = {t: tuple(c.name for c in published_columns(t) if getattr(c, flag)) for t in COLUMNS}
    return {t: names for t, names in found.items() if names}


# The reader's value checks on every published table, however it was read.
NON_NEGATIVE = _flagged("non_negative")
NOT_NULL = _flagged("not_null")
NON_DECREASING = _flagged("non_decreasing")

# Tables every finished trace has (possibly with zero rows).
TABLE_NAMES = tuple(TABLES)
# Tables added to version 1 after its first traces were written: absent means empty.
OPTIONAL_TABLES = ("kv",)


@dataclass(frozen=True)
class MetaKey:
    """One key of meta.json. kind: "string", "counter" (a non-negative integer or null),
    "object" (a JSON object), or None where any JSON value is accepted."""

    name: str
    kind: str | None = None
    required: bool = True
    doc: str = ""


META_FILE = "meta.json"
META_KEYS: tuple[MetaKey, ...] = (
    MetaKey("format", doc=f"always {FORMAT_NAME!r}"),
    MetaKey("schema_version", doc="SCHEMA_VERSION of the writer"),
    MetaKey("run_id", "string"),
    MetaKey("name", "string"),
    MetaKey("backend", "string", doc="Backend"),
    MetaKey("device"),
    MetaKey("torch_version"),
    MetaKey("config", "object", doc="what the user said about the run (batch size, toggles, ...)"),
    MetaKey("allocator_settings"),
    MetaKey("baseline_allocated_bytes", "counter", doc="allocated when the capture began"),
    MetaKey("max_allocated_bytes", "counter", doc="the allocator's own peak"),
    MetaKey("max_reserved_bytes", "counter", doc="null on CPU"),
    MetaKey("events_dropped", "counter"),
    MetaKey("status", required=False, doc="Status; absent while the capture runs"),
    MetaKey(
        "kv_shapes",
        required=False,
        doc="kv cache name -> {layers, kv_heads, head_dim, dtype_bytes, batch} of transformers caches",
    ),
)
META_REQUIRED = tuple(k.name for k in META_KEYS if k.required)
META_STRINGS = tuple(k.name for k in META_KEYS if k.kind == "string")
META_COUNTERS = tuple(k.name for k in META_KEYS if k.kind == "counter")
META_OBJECTS = tuple(k.name for k in META_KEYS if k.kind == "object")


def parquet_name(table: str) -> str:
    return f"{table}.parquet"


def journal_name(table: str) -> str:
    return f"{table}.journal"


def empty_table(table: str) -> pa.Table:
    return TABLES[table].empty_table()


def empty_journal(table: str) -> pa.Table:
    return JOURNALS[table].empty_table()
