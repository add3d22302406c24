"""What a many-rank job's traces cost on disk, and how fast the pages that list them open.

    python bench/ranks.py [--ranks 8,64,256,1024] [--events-per-rank 15000] [--out DIR]
                          [--jobs N] [--json PATH] [--quick]

Builds, for each rank count, one synthetic FSDP training job the way a torchrun
capture lays it out, one hive-style partition per rank:

    <out>/ranks-<W>/<run_id>/rank=0/{meta.json, events.parquet, steps.parquet, ...}
    <out>/ranks-<W>/<run_id>/rank=1/...

Each rank goes through the real capture-side path: TraceWriter.append + flush once a
step (journals), then finalize (tag decoding, block replay, classification, Parquet).
Its events are bench/writer.py's synthetic allocator stream: one step program for
every rank (one model, one batch shape), what drifts from step to step seeded by the
rank, so no two ranks are alike. FSDP2's buffers are tagged as the capture tags them
(all_gather and unsharded_parameter in forward, all_gather and reduce_scatter in
backward); the rank's shards of an 8B-parameter model, their gradients and AdamW's
states are live from the start (parameter, gradient, optimizer_state roles; they
shrink as the world grows); and a rank-dependent activation (uneven sequence
lengths, +-10%) is alive from forward to the end of backward. The ranks' peaks
differ by under 1% at 8 ranks, where the shards dominate, and by up to ~30% (max
over min) at 1024, where activations do. Each rank's meta.json carries run_id (shared),
rank, world_size, local_rank, local_world_size, hostname (8 ranks a node) and
dist_backend; config carries world_size.

Then, per rank count, it measures:
- bytes on disk as written (summary.json caches come later): all files, per rank,
  per event, and events.parquet per event;
- build time: generating the stream, journaling + finalizing (per rank, and the
  wall time of the whole build with --jobs processes, as ranks write in parallel);
- the Runs page's data function, dashboard.data.runs_table(root): cold (no
  summary.json caches: every rank's summary is computed and cached) and warm;
- the Ranks page's data function, profiler.trace.layout.rank_table(run_root),
  with the caches present (when that module exists);
- a duckdb query over the whole job: per rank, max(steps.allocated_bytes) and
  max(steps.max_allocated_bytes) through read_parquet('<run>/*/steps.parquet',
  hive_partitioning=true); and the per-rank peak of cumulative allocated bytes
  over every event ('<run>/*/events.parquet'), checked against each rank's meta.

Timings are wall seconds on this machine, files in the OS page cache (they were
just written): "cold" means without vramscope's own caches, not a cold disk.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import logging
import math
import multiprocessing
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from profiler.trace import schema  # noqa: E402
from profiler.trace.tags import make_tag, parse_tag  # noqa: E402
from profiler.trace.writer import TraceWriter, new_run_id  # noqa: E402


def _load_bench_writer():
    """bench/writer.py (its synthetic allocator stream), imported by path: bench/ is no package."""
    name = "_vramscope_bench_writer"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("writer.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


synth = _load_bench_writer()

DEFAULT_RANKS = (8, 64, 256, 1024)
DEFAULT_EVENTS = 15_000  # 5 steps of ~3,000 events: 15.4M events for the 1024-rank job
QUICK_RANKS = (2, 8, 32)
QUICK_EVENTS = 3_000
PER_STEP = 3_000
RANKS_PER_NODE = 8

# The model whose shards every rank holds: 8.0e9 parameters in 100 FSDP units
# (bench/writer.py's stream runs modules model.layers.0..99.mlp).
MODEL_PARAMS = 8_000_000_000
N_LAYERS = 100
DEVICE = "NVIDIA H100 80GB HBM3"
DEVICE_TOTAL_BYTES = 85_017_493_504
PERSISTENT_BASE = 0x7E00_0000_0000  # below bench/writer.py's pool (0x7F00_0000_0000)
SKEW_ADDR = 0x7EFF_0000_0000  # the rank-dependent activation's own segment
SKEW_BYTES = 384 << 20  # mean size of that activation; it varies +-10% by rank
T0_US = 1_800_000_000_000_000


# -- one rank's trace ---------------------------------------------------------------------------


def _round_block(size: np.ndarray) -> np.ndarray:
    """Bytes of the allocator block for requested sizes (bench/writer.py keeps every request in
    a block of exactly its size class rounded to 512 B, so the replay finds these too)."""
    return (size + 511) // 512 * 512


def _fsdp_tags(chunk: dict) -> list[str]:
    """The tag of each position of one step, with FSDP2's buffers named.

    Every step of bench/writer.py's stream runs one program, event for event, so the
    positions found in one step hold in all. Per module, among its short-lived
    allocations (freed within 16 events): in forward the first is the all-gather's
    output (all_gather) and the second the copy-out into the full parameters
    (unsharded_parameter); in backward the first is the re-gather (all_gather) and the
    last the reduce-scatter's input (reduce_scatter). The stream's kv_cache hints go:
    a training rank has no KV cache.
    """
    tags = chunk["tag"]
    actions = chunk["action"]
    addrs = chunk["addr"]
    n = len(tags)
    alloc_at: dict[int, int] = {}
    frees_of: dict[int, list[int]] = {}
    for i in range(n):
        if actions[i] == "alloc":
            alloc_at[addrs[i]] = i
            frees_of[i] = []
        else:
            j = alloc_at[addrs[i]]
            frees_of[j].append(i)
            if actions[i] == "free_completed":
                del alloc_at[addrs[i]]
    short: dict[tuple[str, str], list[int]] = {}
    for i, fr in frees_of.items():
        phase, module, _ = parse_tag(tags[i])
        if phase in ("forward", "backward") and module and fr and fr[0] - i < 16:
            short.setdefault((phase, module), []).append(i)
    hint: dict[int, str] = {}
    for (phase, _module), allocs in short.items():
        if phase == "forward":
            hint[allocs[0]] = schema.Category.ALL_GATHER.value
            if len(allocs) > 1:
                hint[allocs[1]] = schema.Category.UNSHARDED_PARAMETER.value
        else:
            hint[allocs[0]] = schema.Category.ALL_GATHER.value
            if len(allocs) > 1:
                hint[allocs[-1]] = schema.Category.REDUCE_SCATTER.value
    out = []
    for tag in tags:
        phase, module, category = parse_tag(tag)
        out.append(make_tag(phase, module, None if category == "kv_cache" else category))
    for i, category in hint.items():
        phase, module, _ = parse_tag(out[i])
        out[i] = make_tag(phase, module, category)
        for f in frees_of[i]:
            out[f] = out[i]
    return out


def _shard_layout(world_size: int) -> list[tuple[str, str, int]]:
    """(role, name, bytes) of what a rank keeps for the whole run: fp32 parameter shards,
    their gradients (zero_grad(set_to_none=False)) and AdamW's two states, per FSDP unit.
    FSDP2 pads every shard to ceil(numel / world_size), so all ranks hold the same."""
    per_layer = MODEL_PARAMS // N_LAYERS
    shard_bytes = math.ceil(per_layer / world_size) * 4
    shard_bytes += -shard_bytes % 512
    out = []
    for layer in range(N_LAYERS):
        weight = f"model.layers.{layer}.mlp.weight"
        out += [
            ("parameter", weight, shard_bytes),
            ("gradient", f"{weight}.grad", shard_bytes),
            ("optimizer_state", f"{weight}.exp_avg", shard_bytes),
            ("optimizer_state", f"{weight}.exp_avg_sq", shard_bytes),
        ]
    return out


def _skew_bytes(rank: int) -> int:
    """This rank's extra activation: +-10% around SKEW_BYTES, a whole number of 2 MiB."""
    u = np.random.default_rng(10_000 + rank).random()
    return int(SKEW_BYTES * (0.9 + 0.2 * u)) // (2 << 20) * (2 << 20)


_STATIC: dict = {}


def _frames_and_stacks(n_sites: int = 1500) -> tuple[dict, dict]:
    """Interned frames and stacks for the stream's stack ids (the same code on every rank)."""
    if "frames" not in _STATIC:
        rng = np.random.default_rng(7)
        files = [
            "train.py",
            "model.py",
            "/usr/lib/python3.11/site-packages/torch/nn/modules/module.py",
            "/usr/lib/python3.11/site-packages/torch/nn/functional.py",
            "/usr/lib/python3.11/site-packages/torch/autograd/graph.py",
            "/usr/lib/python3.11/site-packages/torch/optim/adamw.py",
            "/usr/lib/python3.11/site-packages/torch/distributed/fsdp/_fully_shard/_fsdp_collectives.py",
            "/usr/lib/python3.11/site-packages/torch/distributed/fsdp/_fully_shard/_fsdp_param_group.py",
        ]
        funcs = [
            "forward",
            "_call_impl",
            "linear",
            "silu",
            "scaled_dot_product_attention",
            "backward",
            "step",
            "_single_tensor_adamw",
            "foreach_all_gather",
            "foreach_reduce",
            "unshard",
            "post_backward",
            "train_step",
            "main",
        ]
        n_frames = 400
        _STATIC["frames"] = {
            "frame_id": list(range(n_frames)),
            "filename": [files[i % len(files)] for i in range(n_frames)],
            "line": [int(x) for x in rng.integers(1, 2000, n_frames)],
            "function": [funcs[i % len(funcs)] for i in range(n_frames)],
        }
        depth = rng.integers(6, 16, n_sites)
        _STATIC["stacks"] = {
            "stack_id": list(range(n_sites)),
            "frame_ids": [[int(f) for f in rng.integers(0, n_frames, d)] for d in depth],
        }
    return _STATIC["frames"], _STATIC["stacks"]


def _modules(world_size: int) -> dict:
    shard = math.ceil(MODEL_PARAMS // N_LAYERS / world_size)
    rows = [("model", None, "Transformer", 0, 0, 0), ("model.layers", "model", "ModuleList", 1, 0, 0)]
    for layer in range(N_LAYERS):
        block = f"model.layers.{layer}"
        rows += [
            (block, "model.layers", "TransformerBlock", 2, 0, 0),
            (f"{block}.mlp", block, "FeedForward", 3, shard * 4, shard),
        ]
    names = ("module", "parent", "class_name", "depth", "param_bytes", "param_count")
    cols = {k: [r[i] for r in rows] for i, k in enumerate(names)}
    cols["buffer_bytes"] = [0] * len(rows)
    return cols


def rank_meta(run_id: str, rank: int, world_size: int) -> dict:
    """meta.json facts of one rank, as the distributed capture writes them (TraceWriter adds the rest)."""
    return dict(
        backend="cuda",
        device=DEVICE,
        device_total_bytes=DEVICE_TOTAL_BYTES,
        torch_version=_torch_version(),
        config=dict(
            preset="llama-8b-like",
            parallelism="fsdp2",
            world_size=world_size,
            precision="bf16",
            optimizer="adamw",
            batch_size=2,
            seq_len=4096,
            tokens_per_step=2 * 4096,
            synthetic="bench/ranks.py",
        ),
        allocator_settings=dict(expandable_segments=False, max_split_size=-1),
        baseline_allocated_bytes=0,
        max_allocated_bytes=None,
        max_reserved_bytes=None,
        events_dropped=0,
        capture=dict(stacks=True, modules=True, hooked_steps=None, max_entries=1_000_000),
        rank=rank,
        world_size=world_size,
        local_rank=rank % RANKS_PER_NODE,
        local_world_size=min(RANKS_PER_NODE, world_size),
        dist_backend="nccl",
    )


def hostname(rank: int) -> str:
    return f"gpu-node-{rank // RANKS_PER_NODE:04d}"


def _torch_version() -> str:
    if "torch" not in _STATIC:
        try:
            import torch

            _STATIC["torch"] = torch.__version__
        except ImportError:
            _STATIC["torch"] = None
    return _STATIC["torch"]


PROGRAM_SEED = 0  # every rank runs one program: one model, one batch shape


def same_program_events(n_events: int, per_step: int, seed: int):
    """bench/writer.py's synthetic_events with every rank's step program (sizes, tags, sites)
    drawn from PROGRAM_SEED, and what varies from step to step (sizes that drift, which free
    block is picked, timings, side streams) from `seed`: FSDP ranks run the same model on
    different data."""
    real = synth._step_program

    def one_program(_rng, *args):
        return real(np.random.default_rng(PROGRAM_SEED), *args)

    synth._step_program = one_program
    try:
        return synth.synthetic_events(n_events, per_step, seed=seed)
    finally:
        synth._step_program = real


def rank_stream(rank: int, world_size: int, n_events: int, per_step: int = PER_STEP) -> dict:
    """Everything one rank's capture hands the writer: per-step event chunks and the small tables.

    Returns chunks (dicts of Python tuples, as the drain makes them), steps and phases rows
    per chunk, the start snapshot, roles, modules, frames and stacks, and the facts meta
    gets at the end (baseline, peaks, reserved bytes).
    """
    chunks, pool = same_program_events(n_events, per_step, seed=rank)
    tags = _fsdp_tags(chunks[0])
    n = len(tags)
    phase_of = [parse_tag(t)[0] for t in tags]
    first_optimizer = phase_of.index("optimizer") if "optimizer" in phase_of else n
    skew = _skew_bytes(rank)
    skew_tag = make_tag("forward", "model.layers.0", None)
    offset_us = rank * 37 % 1000  # clocks of different hosts and a little launch jitter

    # The start snapshot: the pool of bench/writer.py (inactive), the skew activation's segment,
    # and the persistent shards (allocated, one segment each).
    layout = _shard_layout(world_size)
    addr = PERSISTENT_BASE
    persistent_addr = []
    for _role, _name, nbytes in layout:
        persistent_addr.append(addr)
        addr += nbytes + (2 << 20)
    assert addr < SKEW_ADDR
    seg = {k: list(v) for k, v in pool.items()}
    extra = [(SKEW_ADDR, skew, None, "inactive")] + [
        (a, b, b, "active_allocated") for a, (_r, _n, b) in zip(persistent_addr, layout)
    ]
    for a, b, req, state in extra:
        for k, v in (
            ("snapshot", "start"),
            ("ts_us", T0_US + offset_us),
            ("event_index", 0),
            ("segment_addr", a),
            ("segment_bytes", b),
            ("stream", 0),
            ("segment_type", "large"),
            ("is_expandable", False),
            ("block_addr", a),
            ("block_bytes", b),
            ("requested_bytes", req),
            ("state", state),
        ):
            seg[k].append(v)
    baseline = sum(b for _r, _n, b in layout)
    reserved = sum(seg["segment_bytes"])
    roles = {
        "ts_us": [T0_US + offset_us] * len(layout),
        "event_index": [0] * len(layout),
        "step": [0] * len(layout),
        "addr": persistent_addr,
        "size_bytes": [b for _r, _n, b in layout],
        "role": [r for r, _n, _b in layout],
        "name": [nm for _r, nm, _b in layout],
    }

    out_chunks, steps, phases = [], [], []
    allocated = baseline
    peak = baseline
    seen = 0
    shift = T0_US + offset_us - chunks[0]["ts_us"][0] + 1_000
    for step, c in enumerate(chunks):
        if len(c["tag"]) != n:
            raise AssertionError("bench/writer.py's steps no longer repeat one program")
        ts = [t + shift for t in c["ts_us"]]
        # The skew activation: allocated first thing in forward, freed when backward ends.
        cols = {
            "ts_us": tuple(
                [ts[0] - 1]
                + ts[:first_optimizer]
                + [ts[first_optimizer] - 2, ts[first_optimizer] - 1]
                + ts[first_optimizer:]
            ),
            "action": ("alloc",)
            + c["action"][:first_optimizer]
            + ("free_requested", "free_completed")
            + c["action"][first_optimizer:],
            "addr": (SKEW_ADDR,) + c["addr"][:first_optimizer] + (SKEW_ADDR, SKEW_ADDR) + c["addr"][first_optimizer:],
            "size_bytes": (skew,)
            + c["size_bytes"][:first_optimizer]
            + (skew, skew)
            + c["size_bytes"][first_optimizer:],
            "stream": (0,) + c["stream"][:first_optimizer] + (0, 0) + c["stream"][first_optimizer:],
            "tag": tuple([skew_tag] + tags[:first_optimizer] + [skew_tag, skew_tag] + tags[first_optimizer:]),
            "stack_id": (c["stack_id"][0],)
            + c["stack_id"][:first_optimizer]
            + (None, None)
            + c["stack_id"][first_optimizer:],
        }
        m = len(cols["ts_us"])
        cols["step"] = [step] * m
        out_chunks.append(cols)
        # Allocated bytes as the allocator counts them: blocks, + at alloc, - at free_requested.
        action = np.array(cols["action"], dtype=object)
        block = _round_block(np.array(cols["size_bytes"], dtype=np.int64))
        delta = np.where(action == "alloc", block, np.where(action == "free_requested", -block, 0))
        running = allocated + np.cumsum(delta)
        peak = max(peak, int(running.max()))
        allocated = int(running[-1])
        seen += m
        steps.append(
            dict(
                step=step,
                ts_us=cols["ts_us"][-1] + 5,
                allocated_bytes=allocated,
                reserved_bytes=reserved,
                active_bytes=allocated,
                inactive_split_bytes=0,
                max_allocated_bytes=peak,
                max_reserved_bytes=reserved,
                num_alloc_retries=0,
                num_ooms=0,
                events_seen=seen,
                events_dropped=0,
                modules_hooked=True,
            )
        )
        # Phase spans from the tags: forward, then backward, then the optimizer.
        span_phase = [parse_tag(t)[0] for t in cols["tag"]]
        for phase in ("forward", "backward", "optimizer"):
            idx = [i for i, p in enumerate(span_phase) if p == phase]
            if idx:
                phases.append(
                    dict(step=step, phase=phase, ts_us_start=cols["ts_us"][idx[0]], ts_us_end=cols["ts_us"][idx[-1]])
                )
    frames, stacks = _frames_and_stacks()
    return dict(
        chunks=out_chunks,
        steps=steps,
        phases=phases,
        segments=seg,
        roles=roles,
        modules=_modules(world_size),
        frames=frames,
        stacks=stacks,
        baseline_allocated_bytes=baseline,
        max_allocated_bytes=peak,
        max_reserved_bytes=reserved,
        skew_bytes=skew,
        events=sum(len(c["ts_us"]) for c in out_chunks),
    )


def _rows_to_columns(rows: list[dict]) -> dict:
    return {k: [r[k] for r in rows] for k in rows[0]} if rows else {}


def write_rank(
    out: str | os.PathLike, run_id: str, rank: int, world_size: int, n_events: int, per_step: int = PER_STEP
) -> dict:
    """One rank's partition through TraceWriter: journal a step at a time, then finalize.

    Returns the rank's facts and seconds: gen_s (building the stream, not a cost of
    vramscope), write_s (append + flush, as the capture pays it) and finalize_s.
    """
    t0 = time.perf_counter()
    s = rank_stream(rank, world_size, n_events, per_step)
    t1 = time.perf_counter()
    meta = rank_meta(run_id, rank, world_size)
    meta["baseline_allocated_bytes"] = s["baseline_allocated_bytes"]
    meta["baseline_reserved_bytes"] = s["max_reserved_bytes"]
    w = TraceWriter(out, f"fsdp-{world_size}", meta, run_id=run_id, subdir=f"rank={rank}")
    for table in ("segments", "roles", "modules", "frames", "stacks"):
        w.append(table, s[table])
    w.flush({"hostname": hostname(rank)})
    for i, (cols, step) in enumerate(zip(s["chunks"], s["steps"])):
        w.append("events", cols)
        w.append("steps", _rows_to_columns([step]))
        w.append("phases", _rows_to_columns([p for p in s["phases"] if p["step"] == i]))
        w.flush(
            dict(
                steps_completed=i + 1,
                max_allocated_bytes=step["max_allocated_bytes"],
                max_reserved_bytes=step["max_reserved_bytes"],
            )
        )
    t2 = time.perf_counter()
    w.finalize(
        "complete",
        dict(
            hostname=hostname(rank),
            steps_completed=len(s["steps"]),
            events_seen=s["events"],
            max_allocated_bytes=s["max_allocated_bytes"],
            max_reserved_bytes=s["max_reserved_bytes"],
        ),
    )
    t3 = time.perf_counter()
    return dict(
        rank=rank,
        run_dir=str(w.run_dir),
        events=s["events"],
        baseline_allocated_bytes=s["baseline_allocated_bytes"],
        max_allocated_bytes=s["max_allocated_bytes"],
        max_step_allocated_bytes=max(r["allocated_bytes"] for r in s["steps"]),
        block_replay_misses=w.meta.get("block_replay_misses"),
        gen_s=t1 - t0,
        write_s=t2 - t1,
        finalize_s=t3 - t2,
    )


def _write_rank_args(args):
    return write_rank(*args)


def build_job(
    out: str | os.PathLike,
    world_size: int,
    n_events: int,
    jobs: int = 1,
    per_step: int = PER_STEP,
    run_id: str | None = None,
) -> tuple[Path, list[dict], float]:
    """A world_size-rank job under `out`: (its run directory, each rank's write_rank facts, wall s)."""
    run_id = run_id or new_run_id(f"fsdp-{world_size}")
    work = [(str(out), run_id, rank, world_size, n_events, per_step) for rank in range(world_size)]
    t0 = time.perf_counter()
    if jobs > 1 and world_size > 1:
        methods = multiprocessing.get_all_start_methods()
        ctx = multiprocessing.get_context("fork" if "fork" in methods else None)
        with ctx.Pool(min(jobs, world_size), maxtasksperchild=64) as pool:
            ranks = pool.map(_write_rank_args, work, chunksize=1)
    else:
        ranks = [write_rank(*w) for w in work]
    return Path(out) / run_id, ranks, time.perf_counter() - t0


# -- reading the job --------------------------------------------------------------------------


def steps_sql(run_root: str | os.PathLike) -> str:
    """Per-rank peaks from every rank's steps table, the query the README shows."""
    return (
        f"SELECT rank, max(allocated_bytes) AS max_allocated_bytes, "
        f"max(max_allocated_bytes) AS peak_allocated_bytes "
        f"FROM read_parquet('{Path(run_root).as_posix()}/*/steps.parquet', hive_partitioning=true) "
        f"GROUP BY rank ORDER BY rank"
    )


def events_sql(run_root: str | os.PathLike) -> str:
    """Per-rank peak of cumulative allocated block bytes over every event (add meta's baseline)."""
    return (
        f"SELECT rank, CAST(max(allocated) AS BIGINT) AS peak_delta_bytes FROM ("
        f" SELECT rank, sum(CASE action WHEN 'alloc' THEN block_bytes"
        f" WHEN 'free_requested' THEN -block_bytes ELSE 0 END)"
        f" OVER (PARTITION BY rank ORDER BY file_row_number ROWS UNBOUNDED PRECEDING) AS allocated"
        f" FROM read_parquet('{Path(run_root).as_posix()}/*/events.parquet',"
        f" hive_partitioning=true, file_row_number=true)"
        f") GROUP BY rank ORDER BY rank"
    )


def duckdb_query(sql: str, threads: int | None = None):
    """(DataFrame, seconds) of one query in a fresh in-memory duckdb."""
    import duckdb

    con = duckdb.connect()
    if threads:
        con.execute(f"SET threads={int(threads)}")
    try:
        t0 = time.perf_counter()
        df = con.execute(sql).df()
        return df, time.perf_counter() - t0
    finally:
        con.close()


def disk_bytes(run_root: Path) -> dict:
    """Bytes of every file under the job, of the events files, and of the rest, plus file counts."""
    total = events = files = 0
    for path in Path(run_root).rglob("*"):
        if path.is_file():
            size = path.stat().st_size
            total += size
            files += 1
            if path.name == schema.parquet_name("events"):
                events += size
    return dict(total=total, events=events, other=total - events, files=files)


def remove_summaries(run_root: Path) -> int:
    from profiler.trace.summary_cache import SUMMARY_FILE

    gone = 0
    for path in Path(run_root).glob(f"*/{SUMMARY_FILE}"):
        path.unlink()
        gone += 1
    return gone


def _quiet_streamlit() -> None:
    """dashboard.data decorates with st.cache_*: outside `streamlit run` that logs a warning per
    decorator and call. Streamlit sets its loggers' levels when it is imported: quiet them after
    that and before dashboard.data is."""
    import streamlit  # noqa: F401

    for name in (
        "streamlit",
        "streamlit.runtime.caching.cache_data_api",
        "streamlit.runtime.scriptrunner_utils.script_run_context",
    ):
        logging.getLogger(name).setLevel(logging.ERROR)
    import dashboard.data  # noqa: F401


def rank_table_function():
    """profiler.trace.layout.rank_table, or None while that module does not exist."""
    try:
        module = importlib.import_module("profiler.trace.layout")
    except ImportError:
        return None
    return getattr(module, "rank_table", None)


def timed(fn, *args):
    t0 = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - t0


def measure(root: Path, run_root: Path, ranks: list[dict], cold_ranks: bool = True) -> dict:
    """The page timings and the duckdb queries over one job already built under root."""
    from dashboard.data import runs_table

    res: dict = {}
    remove_summaries(run_root)
    table, res["runs_cold_s"] = timed(runs_table, root)
    res["runs_rows"] = len(table)
    res["runs_errors"] = int(table["error"].notna().sum()) if "error" in table else 0
    table, res["runs_warm_s"] = timed(runs_table, root)
    rank_table = rank_table_function()
    res["rank_table"] = rank_table is not None
    if rank_table is not None:
        rt, res["ranks_warm_s"] = timed(rank_table, run_root)
        res["ranks_rows"] = len(rt)
        if cold_ranks:
            remove_summaries(run_root)
            _, res["ranks_cold_s"] = timed(rank_table, run_root)
    steps_df, res["duckdb_steps_s"] = duckdb_query(steps_sql(run_root))
    events_df, res["duckdb_events_s"] = duckdb_query(events_sql(run_root))
    by_rank = {r["rank"]: r for r in ranks}
    res["duckdb_rows"] = len(steps_df)
    res["duckdb_agrees"] = bool(
        len(steps_df) == len(ranks) == len(events_df)
        and all(
            int(row.max_allocated_bytes) == by_rank[int(row.rank)]["max_step_allocated_bytes"]
            and int(row.peak_allocated_bytes) == by_rank[int(row.rank)]["max_allocated_bytes"]
            for row in steps_df.itertuples()
        )
        and all(
            int(row.peak_delta_bytes) + by_rank[int(row.rank)]["baseline_allocated_bytes"]
            == by_rank[int(row.rank)]["max_allocated_bytes"]
            for row in events_df.itertuples()
        )
    )
    peaks = np.array([r["max_allocated_bytes"] for r in ranks], dtype=np.float64)
    res["peak_skew"] = float(peaks.max() / peaks.min() - 1) if len(peaks) else 0.0
    return res


# -- main -------------------------------------------------------------------------------------


def _fmt_s(value) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", default=None, help="rank counts, comma-separated (default 8,64,256,1024)")
    ap.add_argument(
        "--events-per-rank",
        type=int,
        default=None,
        help=f"allocator events per rank (default {DEFAULT_EVENTS:,}, steps of ~{PER_STEP:,})",
    )
    ap.add_argument("--out", default=None, help="keep the jobs here (default: a temporary directory, removed)")
    ap.add_argument(
        "--jobs", type=int, default=os.cpu_count() or 1, help="processes writing ranks at once (default: one per CPU)"
    )
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument(
        "--quick",
        action="store_true",
        help=f"CI-sized: ranks {','.join(map(str, QUICK_RANKS))}, {QUICK_EVENTS:,} events each",
    )
    ap.add_argument("--no-cold-ranks", action="store_true", help="skip timing rank_table without summary.json caches")
    args = ap.parse_args(argv)
    rank_counts = (
        [int(x) for x in args.ranks.split(",")] if args.ranks else list(QUICK_RANKS if args.quick else DEFAULT_RANKS)
    )
    n_events = args.events_per_rank or (QUICK_EVENTS if args.quick else DEFAULT_EVENTS)

    import pyarrow

    _quiet_streamlit()
    try:
        import duckdb

        duckdb_version = duckdb.__version__
    except ImportError:
        raise SystemExit("bench/ranks.py needs duckdb: pip install duckdb") from None
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, no GPU used "
        f"(synthetic CUDA-style traces); torch {_torch_version()}, pyarrow {pyarrow.__version__}, "
        f"duckdb {duckdb_version}, Python {platform.python_version()}; load average "
        f"{os.getloadavg()[0]:.2f}"
    )
    print(
        f"ranks {rank_counts}, ~{n_events:,} events per rank in steps of ~{PER_STEP:,}, "
        f"{args.jobs} writer processes; rank_table: "
        f"{'profiler.trace.layout' if rank_table_function() else 'not present'}"
    )

    keep = args.out is not None
    out = Path(args.out) if keep else Path(tempfile.mkdtemp(prefix="vramscope-bench-ranks-"))
    out.mkdir(parents=True, exist_ok=True)
    results = []
    try:
        # One-time costs (imports, pyarrow's first conversions) paid before timing.
        warm = out / "warm-up"
        build_job(warm, 2, min(n_events, 3_000), jobs=1)
        from dashboard.data import runs_table

        runs_table(warm)
        shutil.rmtree(warm)
        for world in rank_counts:
            root = out / f"ranks-{world}"
            run_root, ranks, build_s = build_job(root, world, n_events, jobs=args.jobs)
            disk = disk_bytes(run_root)
            events = sum(r["events"] for r in ranks)
            res = dict(
                ranks=world,
                events=events,
                build_wall_s=build_s,
                gen_s=sum(r["gen_s"] for r in ranks),
                write_s=sum(r["write_s"] for r in ranks),
                finalize_s=sum(r["finalize_s"] for r in ranks),
                block_replay_misses=sum(r["block_replay_misses"] or 0 for r in ranks),
                disk_total_bytes=disk["total"],
                disk_events_bytes=disk["events"],
                disk_other_bytes=disk["other"],
                files=disk["files"],
                bytes_per_rank=disk["total"] / world,
                bytes_per_event=disk["total"] / events,
                events_bytes_per_event=disk["events"] / events,
                other_bytes_per_rank=disk["other"] / world,
            )
            res.update(measure(root, run_root, ranks, cold_ranks=not args.no_cold_ranks))
            results.append(res)
            print(
                f"  {world:>5} ranks: built in {build_s:.1f} s, runs_table cold "
                f"{res['runs_cold_s']:.2f} s / warm {res['runs_warm_s']:.2f} s, duckdb "
                f"{res['duckdb_steps_s']:.2f} + {res['duckdb_events_s']:.2f} s",
                flush=True,
            )
    finally:
        if not keep:
            shutil.rmtree(out, ignore_errors=True)

    print()
    head = (
        f"{'ranks':>5} {'events':>11} {'disk MiB':>9} {'KiB/rank':>9} {'B/event':>8} "
        f"{'ev.pq B/ev':>10} {'write s/rank':>12} {'final s/rank':>12} {'build wall s':>12} "
        f"{'runs cold s':>11} {'runs warm s':>11} {'rows':>5} {'ranks warm s':>12} "
        f"{'ranks cold s':>12} {'duck steps s':>12} {'duck events s':>13} {'skew':>6} ok"
    )
    print(head)
    for r in results:
        w = r["ranks"]
        print(
            f"{w:>5} {r['events']:>11,} {r['disk_total_bytes'] / 2**20:>9.1f} "
            f"{r['bytes_per_rank'] / 1024:>9.1f} {r['bytes_per_event']:>8.2f} "
            f"{r['events_bytes_per_event']:>10.2f} {r['write_s'] / w:>12.3f} "
            f"{r['finalize_s'] / w:>12.3f} {r['build_wall_s']:>12.1f} {r['runs_cold_s']:>11.2f} "
            f"{r['runs_warm_s']:>11.2f} {r['runs_rows']:>5} {_fmt_s(r.get('ranks_warm_s')):>12} "
            f"{_fmt_s(r.get('ranks_cold_s')):>12} {r['duckdb_steps_s']:>12.2f} "
            f"{r['duckdb_events_s']:>13.2f} {r['peak_skew']:>6.1%} "
            f"{'yes' if r['duckdb_agrees'] and not r['block_replay_misses'] else 'NO'}"
        )
    print(
        "\ndisk: every file of the job as written (meta.json and 9 Parquet tables per rank; the "
        "pages' summary.json caches, ~2 KB a rank, come later and are not counted); "
        "B/event = all of it over the job's events; ev.pq = events.parquet alone. "
        "write = journal append + flush per step, final = finalize (both per rank, one process); "
        "build wall = all ranks with the writer processes above, stream generation included. "
        "runs = dashboard.data.runs_table(root): cold without summary.json caches, warm with "
        "them; rows = its rows. ranks = profiler.trace.layout.rank_table(run_root). "
        "duck steps / events = the per-rank duckdb queries over steps.parquet and events.parquet. "
        "skew = max/min - 1 of the ranks' peaks. ok = duckdb agrees with every rank's meta and "
        "no block replay missed."
    )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                dict(
                    machine=dict(
                        cpus=os.cpu_count(),
                        torch=_torch_version(),
                        pyarrow=pyarrow.__version__,
                        duckdb=duckdb_version,
                        python=platform.python_version(),
                    ),
                    events_per_rank=n_events,
                    results=results,
                ),
                indent=1,
            )
        )
    bad = [r["ranks"] for r in results if not r["duckdb_agrees"] or r["block_replay_misses"]]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
