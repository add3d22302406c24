"""What the dashboard's data costs: seconds per page on a synthetic 10M-event run.

    python bench/analysis.py [--events 10000000] [--repeat 3] [--runs 8]

The trace is built in memory (no Parquet round trip), with the reader's dtypes:
a GPT-like module tree of ~150 modules, steps of forward / backward / optimizer
phases, and every free as free_requested then free_completed (15% of them
completed up to 30 events later, as a block with pending stream uses is).
Addresses come from a small caching-allocator model, so they repeat across
steps as a real allocator's do.

Timed, each from a cold start (nothing shared between pages but the Trace):
- Overview: the functions its charts and header call (timeline, peak, categories,
  spans, fragmentation at the peak);
- Layers: the module table and its subtree roll-up;
- Compare: 8 runs' summaries read from summary.json and lined up, plus what one
  summary costs to compute when its cache is missing.
Budgets (2-core machine): 2 s per page, 3 s for the 8-run compare.
"""

from __future__ import annotations

import argparse
import heapq
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from profiler.trace import schema  # noqa: E402
from profiler.trace.model import Trace  # noqa: E402

BUDGET_PAGE_S = 2.0
BUDGET_COMPARE_S = 3.0

ACTIONS = [a.value for a in schema.Action]
A = {a: i for i, a in enumerate(ACTIONS)}
PHASES = ["forward", "backward", "optimizer"]
CATS = [c.value for c in schema.Category]
C = {c: i for i, c in enumerate(CATS)}
MIB = 1 << 20
SEG_BYTES = 1 << 30
TEMPLATES = 4


# -- the model ------------------------------------------------------------------------


def module_tree(n_blocks: int = 20) -> tuple[list[dict], list[str]]:
    """~150 modules (rows of the modules table) and the leaves in forward order."""
    rows, leaves = [], []

    def add(name, parent, cls, depth, params=0):
        rows.append(
            dict(
                module=name,
                parent=parent,
                class_name=cls,
                depth=depth,
                param_bytes=params,
                buffer_bytes=0,
                param_count=params // 2,
            )
        )

    add("model", None, "GPT", 0)
    add("model.embed", "model", "Embedding", 1, 64 * MIB)
    leaves.append("model.embed")
    add("model.blocks", "model", "ModuleList", 1)
    for b in range(n_blocks):
        blk = f"model.blocks.{b}"
        add(blk, "model.blocks", "Block", 2)
        for leaf, cls, params in (
            ("ln1", "LayerNorm", 8192),
            ("attn", "Attention", 0),
            ("attn.qkv", "Linear", 18 * MIB),
            ("attn.proj", "Linear", 6 * MIB),
            ("mlp", "MLP", 0),
            ("mlp.fc", "Linear", 24 * MIB),
        ):
            parent = blk + "." + leaf.rsplit(".", 1)[0] if "." in leaf else blk
            add(f"{blk}.{leaf}", parent, cls, 3 + leaf.count("."), params)
        leaves += [f"{blk}.ln1", f"{blk}.attn.qkv", f"{blk}.attn", f"{blk}.attn.proj", f"{blk}.mlp.fc", f"{blk}.mlp"]
    add("model.ln_f", "model", "LayerNorm", 1, 8192)
    add("model.head", "model", "Linear", 1, 64 * MIB)
    leaves += ["model.ln_f", "model.head"]
    return rows, leaves


class _Allocator:
    """Addresses by block size: a freed block's address is reused once its free completed."""

    def __init__(self, base: int):
        self.free: dict[int, list[int]] = {}
        self.top = base

    def alloc(self, size: int) -> int:
        pool = self.free.get(size)
        if pool:
            return pool.pop()
        addr = self.top
        self.top += size
        return addr

    def release(self, addr: int, size: int) -> None:
        self.free.setdefault(size, []).append(addr)


class _StepBuilder:
    """One step's events as parallel lists; tiled over steps by build_trace."""

    def __init__(self, modules: list[str], rng: np.random.Generator, heap: _Allocator):
        self.rng = rng
        self.mod = {m: i for i, m in enumerate(modules)}
        self.heap = heap
        self.cols = {k: [] for k in ("action", "addr", "size", "block", "module", "phase", "category")}
        self.pending: list[tuple[int, int, int, int, int]] = []  # (due, addr, block, size, cat)
        self.module = 0
        self.phase = 0
        self.phase_starts: list[int] = []

    def __len__(self):
        return len(self.cols["action"])

    def _emit(self, action, addr, size, block, cat):
        c = self.cols
        c["action"].append(A[action])
        c["addr"].append(addr)
        c["size"].append(size)
        c["block"].append(block)
        c["module"].append(self.module)
        c["phase"].append(self.phase)
        c["category"].append(cat)
        while self.pending and self.pending[0][0] <= len(self):
            _, a, b, s, k = heapq.heappop(self.pending)
            self._complete(a, s, b, k)

    def _complete(self, addr, size, block, cat):
        self._emit("free_completed", addr, size, block, cat)
        self.heap.release(addr, block)

    def set_phase(self, phase: str) -> None:
        self.phase = PHASES.index(phase)
        self.phase_starts.append(len(self))

    def alloc(self, block: int, cat: str, module: str) -> tuple[int, int, int, int]:
        self.module = self.mod[module]
        size = block - int(self.rng.integers(0, 512)) if block > 512 else block
        addr = self.heap.alloc(block)
        self._emit("alloc", addr, size, block, C[cat])
        return addr, size, block, C[cat]

    def free(self, blk: tuple[int, int, int, int], module: str | None = None) -> None:
        if module is not None:
            self.module = self.mod[module]
        addr, size, block, cat = blk
        self._emit("free_requested", addr, size, block, cat)
        if self.rng.random() < 0.15:  # pending stream uses: completed a few events later
            heapq.heappush(self.pending, (len(self) + int(self.rng.integers(1, 31)), addr, block, size, cat))
        else:
            self._complete(addr, size, block, cat)

    def drain(self) -> None:
        """End of step: the allocator synchronises, every pending free completes."""
        while self.pending:
            _, a, b, s, k = heapq.heappop(self.pending)
            self._complete(a, s, b, k)


def _template(
    leaves: list[str], modules: list[str], temps: int, rng: np.random.Generator, heap: _Allocator
) -> _StepBuilder:
    """One step. Sizes are drawn per template, so that steps of different templates
    use different blocks, and the address space has thousands of distinct addresses."""
    sizes_act = (rng.integers(1, 48, 24) * MIB // 2).tolist()
    sizes_tmp = (rng.integers(1, 16384, 48) * 512).tolist()
    b = _StepBuilder(modules, rng, heap)

    def temporaries(module):
        live = []
        for _ in range(temps):
            live.append(b.alloc(int(rng.choice(sizes_tmp)), "temporary", module))
            if len(live) > 2 or rng.random() < 0.5:
                b.free(live.pop(0))
        for blk in live:
            b.free(blk)

    b.set_phase("forward")
    acts = []
    for m in leaves:
        acts.append(b.alloc(int(rng.choice(sizes_act)), "activation", m))
        temporaries(m)
    b.set_phase("backward")
    grads = []
    for m, act in zip(reversed(leaves), reversed(acts)):
        grad_in = b.alloc(int(rng.choice(sizes_act)), "temporary", m)
        temporaries(m)
        grads.append(b.alloc(int(rng.choice(sizes_act)), "gradient", m))
        b.free(act, m)
        b.free(grad_in, m)
    b.set_phase("optimizer")
    for m, g in zip(leaves, grads):
        for _ in range(2):
            b.free(b.alloc(int(rng.choice(sizes_tmp)), "temporary", m))
        b.free(g, m)
    b.drain()
    return b


# -- the trace ------------------------------------------------------------------------


def build_trace(n_events: int = 10_000_000, steps: int = 400, seed: int = 0, path: Path | None = None) -> Trace:
    """A Trace of at least n_events events (whole steps of about n_events / steps), dtypes as
    the reader's (dictionary columns as Categoricals, nullable ints as floats)."""
    rng = np.random.default_rng(seed)
    mods, leaves = module_tree()
    modules = [r["module"] for r in mods]
    per_step = n_events / steps
    # A step costs about 13 + 6 * temps events per leaf: pick temps to land near per_step.
    temps = max(1, round((per_step / len(leaves) - 13) / 6))
    arena = 0x7F0000000000
    heap = _Allocator(arena)
    # A few step templates (think: sequence lengths) from one allocator, cycled over the steps.
    templates = [_template(leaves, modules, temps, rng, heap) for _ in range(TEMPLATES)]
    steps = -(-n_events // round(np.mean([len(t) for t in templates])))
    order = [s % TEMPLATES for s in range(steps)]
    lengths = np.array([len(templates[k]) for k in order], dtype=np.int64)
    cols = {
        name: np.concatenate([np.asarray(templates[k].cols[name], dtype=np.int64) for k in order])
        for name in templates[0].cols
    }
    while int(lengths.sum()) < n_events:  # whole steps, at least n_events
        order.append(len(order) % TEMPLATES)
        lengths = np.append(lengths, len(templates[order[-1]]))
        for name in cols:
            cols[name] = np.concatenate([cols[name], np.asarray(templates[order[-1]].cols[name], np.int64)])
    steps = len(order)
    step_start = np.concatenate([[0], np.cumsum(lengths)[:-1]])

    # The start snapshot: parameters and optimizer state live in one segment, a few blocks
    # still pending free from the warm-up, and the arena reserved as 1 GiB segments.
    params = [r["param_bytes"] for r in mods if r["param_bytes"]]
    seg0 = 0x7E0000000000
    blocks, addr = [], seg0
    for p in params:
        for cat in ("parameter", "optimizer_state", "optimizer_state"):
            blocks.append((addr, p, "active_allocated", cat))
            addr += p
    for _ in range(3):
        blocks.append((addr, 2 * MIB, "active_pending_free", None))
        addr += 2 * MIB
    seg0_bytes = -(-(addr - seg0) // SEG_BYTES) * SEG_BYTES
    if addr < seg0 + seg0_bytes:
        blocks.append((addr, seg0 + seg0_bytes - addr, "inactive", None))
    arena_bytes = -(-(heap.top - arena) // SEG_BYTES) * SEG_BYTES
    seg_rows = [
        dict(
            snapshot="start",
            ts_us=0,
            event_index=0,
            segment_addr=seg0,
            segment_bytes=seg0_bytes,
            stream=0,
            segment_type="large",
            is_expandable=False,
            block_addr=a,
            block_bytes=s,
            requested_bytes=s,
            state=st,
            category=c,
            stack_id=None,
        )
        for a, s, st, c in blocks
    ]
    seg_rows += [
        dict(
            snapshot="start",
            ts_us=0,
            event_index=0,
            segment_addr=arena + i * SEG_BYTES,
            segment_bytes=SEG_BYTES,
            stream=0,
            segment_type="large",
            is_expandable=False,
            block_addr=arena + i * SEG_BYTES,
            block_bytes=SEG_BYTES,
            requested_bytes=0,
            state="inactive",
            category=None,
            stack_id=None,
        )
        for i in range(arena_bytes // SEG_BYTES)
    ]
    # The pending baseline blocks complete during the first step; one more segment comes and goes.
    extra = arena + arena_bytes
    prefix = [
        (A["free_completed"], seg0 + sum(p for p in params) * 3 + i * 2 * MIB, 2 * MIB, 2 * MIB, C["other"])
        for i in range(3)
    ]
    prefix += [
        (A["segment_alloc"], extra, SEG_BYTES, SEG_BYTES, -1),
        (A["segment_free"], extra, SEG_BYTES, SEG_BYTES, -1),
    ]
    P = len(prefix)
    n = P + int(lengths.sum())

    def with_prefix(values, pre):
        return np.concatenate([np.asarray(pre, dtype=np.int64), values])

    dt = rng.integers(1, 6, n - P).astype(np.int64)
    step_gap = np.repeat(np.arange(steps, dtype=np.int64) * 200, lengths)  # host time between steps
    ts = np.concatenate([np.arange(P, dtype=np.int64), P + np.cumsum(dt) + step_gap])
    step = np.concatenate([np.zeros(P, np.int32), np.repeat(np.arange(steps, dtype=np.int32), lengths)])
    action = with_prefix(cols["action"], [p[0] for p in prefix])
    is_alloc = action == A["alloc"]
    stack = np.where(is_alloc, rng.integers(0, 5000, n), -1)

    def dictionary(codes, values):
        codes = np.asarray(codes, dtype=np.int32)
        return pa.DictionaryArray.from_arrays(pa.array(codes, mask=codes < 0), pa.array(values, pa.string()))

    events = pa.table(
        {
            "ts_us": ts,
            "action": dictionary(action, ACTIONS),
            "addr": with_prefix(cols["addr"], [p[1] for p in prefix]),
            "size_bytes": with_prefix(cols["size"], [p[2] for p in prefix]),
            "block_bytes": with_prefix(cols["block"], [p[3] for p in prefix]),
            "stream": np.zeros(n, np.int64),
            "step": step,
            "module": dictionary(with_prefix(cols["module"], [-1] * P), modules),
            "phase": dictionary(with_prefix(cols["phase"], [0] * P), PHASES),
            "category": dictionary(with_prefix(cols["category"], [p[4] for p in prefix]), CATS),
            "stack_id": pa.array(stack.astype(np.int32), mask=stack < 0),
        },
        schema=schema.TABLES["events"],
    )

    first = P + step_start
    last = first + lengths - 1
    step_end = ts[last] + 50
    phase_rows = []
    for s_, k in enumerate(order):
        bounds = templates[k].phase_starts + [len(templates[k])]
        phase_rows += [
            dict(
                step=s_,
                phase=PHASES[j],
                ts_us_start=int(ts[first[s_] + bounds[j]]),
                ts_us_end=int(ts[first[s_] + bounds[j + 1] - 1]),
            )
            for j in range(3)
        ]
    baseline = sum(s for _, s, st, _ in blocks if st == "active_allocated")
    steps_rows = dict(
        step=np.arange(steps, dtype=np.int32),
        ts_us=step_end,
        allocated_bytes=np.full(steps, baseline, np.int64),
        reserved_bytes=np.full(steps, seg0_bytes + arena_bytes, np.int64),
        max_allocated_bytes=np.zeros(steps, np.int64),
    )
    meta = dict(
        format=schema.FORMAT_NAME,
        schema_version=schema.SCHEMA_VERSION,
        run_id="bench-10m",
        name="bench",
        backend="cuda",
        device="cuda:0",
        torch_version="bench",
        config={"tokens_per_step": 8 * 1024, "ckpt": False},
        allocator_settings=None,
        baseline_allocated_bytes=baseline,
        max_allocated_bytes=None,
        max_reserved_bytes=None,
        events_dropped=0,
        status="complete",
    )

    def frame(table, data):
        target = schema.TABLES[table]
        cols_ = {f.name: data.get(f.name) for f in target}
        n_rows = len(next(v for v in cols_.values() if v is not None))
        arrays = [
            pa.nulls(n_rows, f.type) if cols_[f.name] is None else pa.array(cols_[f.name]).cast(f.type) for f in target
        ]
        return pa.Table.from_arrays(arrays, schema=target).to_pandas()

    def rows(table, rs):
        return frame(table, {k: [r.get(k) for r in rs] for k in rs[0]})

    return Trace(
        path=path or Path("bench-10m"),
        meta=meta,
        events=events.to_pandas(),
        steps=frame("steps", steps_rows),
        phases=rows("phases", phase_rows),
        modules=rows("modules", mods),
        roles=schema.empty_table("roles").to_pandas(),
        segments=rows("segments", seg_rows),
        kv=schema.empty_table("kv").to_pandas(),
        frames=schema.empty_table("frames").to_pandas(),
        stacks=schema.empty_table("stacks").to_pandas(),
    )


# -- the pages --------------------------------------------------------------------------


def overview_page(trace) -> None:
    """What the Overview page computes: the counters over time, the peak, steps and phases,
    categories over time and at the peak, fragmentation at the peak."""
    from profiler import analysis as A

    lt = A.lifetimes(trace)
    A.memory_timeline(trace, lt, max_points=4000)
    A.peak(trace, lt)
    A.step_spans(trace, lt)
    A.phase_spans(trace)
    A.category_timeline(trace, max_points=4000, lt=lt)
    A.category_at_peak(trace, lt)
    A.fragmentation_at_peak(trace, lt)


def layers_page(trace) -> None:
    """What the Layers page computes: the module table and its subtree roll-up (treemap)."""
    from profiler import analysis as A

    lt = A.lifetimes(trace)
    A.rollup(A.module_table(trace, lt=lt))


def summary_cold(trace) -> None:
    """One run's summary when summary.json is missing: what the first visit to Runs costs per run."""
    from profiler.analysis import run_summary

    run_summary(trace)


def make_compare_runs(root: Path, summary: dict, n_runs: int) -> list[Path]:
    """n_runs run directories with meta.json and a cached summary.json (variants of `summary`)."""
    from profiler.trace.summary_cache import write_summary

    dirs = []
    for i in range(n_runs):
        run = root / f"run-{i}"
        run.mkdir(parents=True)
        meta = dict(
            format=schema.FORMAT_NAME,
            schema_version=schema.SCHEMA_VERSION,
            run_id=run.name,
            name=f"variant {i}",
            backend="cuda",
            device="cuda:0",
            torch_version="bench",
            config={"tokens_per_step": 8 * 1024, "ckpt": bool(i % 2), "micro_batch": 1 + i},
            allocator_settings=None,
            baseline_allocated_bytes=0,
            max_allocated_bytes=None,
            max_reserved_bytes=None,
            events_dropped=0,
            status="complete",
        )
        (run / schema.META_FILE).write_text(json.dumps(meta))
        scale = 1.0 - 0.05 * i
        variant = {
            **summary,
            "run_id": run.name,
            "name": meta["name"],
            "config": meta["config"],
            "peak_allocated_bytes": int(summary["peak_allocated_bytes"] * scale),
            "median_step_time_us": summary["median_step_time_us"] * (1 + 0.03 * i),
            "categories_at_peak_bytes": {c: int(b * scale) for c, b in summary["categories_at_peak_bytes"].items()},
        }
        write_summary(run, variant)
        dirs.append(run)
    return dirs


def compare_page(run_dirs: list[Path]) -> None:
    """What the Compare page computes: every run's summary (from cache), the table, one category diff."""
    from profiler.analysis import compare_categories, compare_summaries
    from profiler.trace.summary_cache import load_summaries

    def no_trace(path):  # a cache miss here would be a bug in the bench, not a slow page
        raise AssertionError(f"{path}: summary.json was not used")

    summaries = load_summaries(run_dirs, load=no_trace)
    compare_summaries(summaries, baseline=0)
    compare_categories(summaries[0], summaries[-1])


def _time(fn, *args, repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn(*args)
        out.append(time.perf_counter() - t)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=10_000_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--runs", type=int, default=8)
    args = parser.parse_args(argv)

    t = time.perf_counter()
    trace = build_trace(args.events)
    ev = trace.events
    print(
        f"synthetic trace: {len(ev):,} events, {ev['step'].nunique()} steps, "
        f"{ev['addr'].nunique():,} addresses, {len(trace.modules)} modules "
        f"(built in {time.perf_counter() - t:.1f} s)"
    )

    from profiler.analysis import run_summary

    results = [
        ("Overview", _time(overview_page, trace, repeat=args.repeat), BUDGET_PAGE_S),
        ("Layers", _time(layers_page, trace, repeat=args.repeat), BUDGET_PAGE_S),
        ("summary, cache miss (1 run)", _time(summary_cold, trace, repeat=args.repeat), None),
    ]
    summary = run_summary(trace)
    with tempfile.TemporaryDirectory() as tmp:
        dirs = make_compare_runs(Path(tmp), summary, args.runs)
        results.append(
            (
                f"Compare, {args.runs} runs via summary.json",
                _time(compare_page, dirs, repeat=args.repeat),
                BUDGET_COMPARE_S,
            )
        )

    print(f"\n{'page':<34}{'first s':>9}{'median s':>10}{'max s':>8}{'budget s':>10}  verdict")
    failed = False
    for name, times, budget in results:
        ok = budget is None or max(times) <= budget
        failed |= not ok
        verdict = "" if budget is None else ("ok" if ok else "OVER BUDGET")
        print(
            f"{name:<34}{times[0]:>9.3f}{statistics.median(times):>10.3f}{max(times):>8.3f}"
            f"{'' if budget is None else f'{budget:.1f}':>10}  {verdict}"
        )
    print(
        f"\npeak allocated {summary['peak_allocated_bytes']:,} B at event {summary['peak_event_index']:,}; "
        f"active then {summary['active_at_peak_bytes']:,} B; peak reserved {summary['peak_reserved_bytes']:,} B"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
