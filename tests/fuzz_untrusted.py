"""Run seeded mutations of a real trace and hostile snapshot pickles through the CLI, in this process.

    python tests/fuzz_untrusted.py --first 0 --count 250 --pickles 0:2 --memory-gib 3

Each mutation copies the bundled trace, changes one to three things in it (a cell, an action, rows,
a column's type, a meta.json value, a file cut short or turned into a FIFO or a link to /dev/zero,
a rank=0/ folder inside the run) and runs `vramscope report --json` on it; each pickle is imported,
and the imported run reported. A case passes when the exit code is 0 or 2, an exit 2 prints one
`vramscope: error:` line, nothing raises, it ends within its time, and a report that exits 0 keeps
its invariants: the peak is the replay of its events (baseline + allocations - frees, the
allocator's block bytes), no listed module holds more at the peak than the peak, the categories at
the peak add up to it, and an imported run's peak is the one the import replayed. Prints one JSON
object: cases run and the failures of each kind. Memory is capped with RLIMIT_AS (--memory-gib).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import resource
import shutil
import signal
import sys
import tempfile
import traceback
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))
sys.path.insert(0, str(TESTS.parent))

import hostile_pickles  # noqa: E402

from profiler.cli import main  # noqa: E402

BASE = TESTS.parent / "traces" / "gpt2-small-bf16-h100"
# A case that spins for 20 s of its own CPU time hangs; one that waits 120 s of wall time
# hangs too. CPU time, not wall time, for the first: a loaded machine must not turn a slow
# case into a hang.
CASE_CPU_SECONDS = 20
CASE_WALL_SECONDS = 120
EDGES = [-1, 0, 1, 7, 1000, 2**31, 2**62, 2**63 - 1, -(2**63), None]
META_KEYS = ["baseline_allocated_bytes", "max_allocated_bytes", "max_reserved_bytes", "events_dropped", "status"]
META_VALUES = [-1, 0, 2**63, 2**63 - 1, 2**64, 1.5, "x", None, True, [], {}]
ACTIONS = ["alloc", "free_requested", "free_completed", "segment_alloc", "segment_free", "oom", "snapshot"]


class Hang(Exception):
    pass


# -- mutations: each takes a Random and the run directory -------------------------------------


def _rewrite(path: Path, change) -> None:
    try:
        table = pq.read_table(path)
        table = change(table)
    except Exception:  # noqa: BLE001 - an earlier mutation left it unreadable, or the change does not fit
        return
    pq.write_table(table, path)


def _tables(run: Path) -> list[Path]:
    return sorted(p for p in run.glob("*.parquet") if p.is_file() and not p.is_symlink())


def set_cell(rnd: random.Random, run: Path) -> None:
    path = run / rnd.choice(["events.parquet"] * 4 + [p.name for p in _tables(run)])

    def change(t: pa.Table) -> pa.Table:
        ints = [i for i, f in enumerate(t.schema) if pa.types.is_integer(f.type)]
        j = rnd.choice(ints)
        values = t.column(j).to_pylist()
        values[rnd.randrange(len(values))] = rnd.choice(EDGES + [rnd.randrange(-(10**6), 10**12)])
        return t.set_column(j, t.schema.field(j).name, pa.array(values, pa.int64()))

    _rewrite(path, change)


def set_action(rnd: random.Random, run: Path) -> None:
    def change(t: pa.Table) -> pa.Table:
        j = t.schema.get_field_index("action")
        values = t.column(j).to_pylist()
        values[rnd.randrange(len(values))] = rnd.choice(ACTIONS)
        return t.set_column(j, "action", pa.array(values).dictionary_encode())

    _rewrite(run / "events.parquet", change)


def drop_rows(rnd: random.Random, run: Path) -> None:
    def change(t: pa.Table) -> pa.Table:
        keep = np.ones(t.num_rows, dtype=bool)
        keep[rnd.sample(range(t.num_rows), min(t.num_rows, rnd.randint(1, 50)))] = False
        return t.filter(pa.array(keep))

    _rewrite(run / rnd.choice(["events.parquet", "events.parquet", "steps.parquet", "segments.parquet"]), change)


def duplicate_rows(rnd: random.Random, run: Path) -> None:
    def change(t: pa.Table) -> pa.Table:
        i = rnd.randrange(t.num_rows)
        order = list(range(t.num_rows))
        order[i + 1 : i + 1] = [i] * rnd.randint(1, 3)
        return t.take(order)

    _rewrite(run / "events.parquet", change)


def retype_column(rnd: random.Random, run: Path) -> None:
    tables = _tables(run)
    if not tables:
        return
    typ = rnd.choice([pa.string(), pa.float64(), pa.int8(), pa.uint64(), pa.bool_(), pa.int32()])

    def change(t: pa.Table) -> pa.Table:
        j = rnd.randrange(t.num_columns)
        try:
            col = t.column(j).cast(typ)
        except Exception:  # noqa: BLE001 - not castable: the column's values become nulls
            col = pa.nulls(t.num_rows, typ)
        return t.set_column(j, t.schema.field(j).name, col)

    _rewrite(rnd.choice(tables), change)


def drop_column(rnd: random.Random, run: Path) -> None:
    tables = _tables(run)
    if tables:
        _rewrite(rnd.choice(tables), lambda t: t.remove_column(rnd.randrange(t.num_columns)))


def edit_meta(rnd: random.Random, run: Path) -> None:
    try:
        meta = json.loads((run / "meta.json").read_text())
    except Exception:  # noqa: BLE001 - already broken
        return
    meta[rnd.choice(META_KEYS)] = rnd.choice(META_VALUES)
    (run / "meta.json").write_text(json.dumps(meta))


def cut_file(rnd: random.Random, run: Path) -> None:
    files = [p for p in sorted(run.iterdir()) if p.is_file() and not p.is_symlink()]
    if files:
        f = rnd.choice(files)
        data = f.read_bytes()
        f.write_bytes(data[: rnd.randrange(len(data) + 1)])


def flip_bytes(rnd: random.Random, run: Path) -> None:
    files = [p for p in sorted(run.iterdir()) if p.is_file() and not p.is_symlink()]
    if files:
        f = rnd.choice(files)
        data = bytearray(f.read_bytes())
        for _ in range(rnd.randint(1, 8)):
            if data:
                data[rnd.randrange(len(data))] ^= rnd.randint(1, 255)
        f.write_bytes(bytes(data))


def special_file(rnd: random.Random, run: Path) -> None:
    """A table or meta.json, or an unfinished run's journal, that is a FIFO or a link to /dev/zero."""
    name = rnd.choice(["events.parquet", "steps.parquet", "meta.json", "events.journal"])
    if name == "events.journal":
        with contextlib.suppress(Exception):
            meta = json.loads((run / "meta.json").read_text())
            meta["status"] = None
            (run / "meta.json").write_text(json.dumps(meta))
        (run / "events.parquet").unlink(missing_ok=True)
    path = run / name
    path.unlink(missing_ok=True)
    if rnd.random() < 0.5:
        os.mkfifo(path)
    else:
        path.symlink_to("/dev/zero")


def rank_folder_inside(rnd: random.Random, run: Path) -> None:
    shutil.copytree(BASE, run / "rank=0")


MUTATIONS = [
    set_cell,
    set_cell,
    set_action,
    drop_rows,
    duplicate_rows,
    retype_column,
    drop_column,
    edit_meta,
    cut_file,
    flip_bytes,
    special_file,
    rank_folder_inside,
]


# -- invariants of a report that exits 0 --------------------------------------------------------


def replayed_peak(run: Path) -> int:
    """baseline + allocations - frees (free_requested, or free_completed in a trace without
    requests), each of the allocator's block bytes where the trace has them; the most of it."""
    ev = pq.read_table(run / "events.parquet").to_pandas()
    meta = json.loads((run / "meta.json").read_text())
    actions = ev["action"].astype(str).to_numpy()
    size = ev["size_bytes"].to_numpy(dtype=np.int64)
    if "block_bytes" in ev:
        block = ev["block_bytes"].to_numpy(dtype=np.float64, na_value=np.nan)
        size = np.where(np.isnan(block), size, np.nan_to_num(block)).astype(np.int64)
    release = "free_requested" if (actions == "free_requested").any() else "free_completed"
    delta = np.where(actions == "alloc", size, 0) - np.where(actions == release, size, 0)
    baseline = int(meta.get("baseline_allocated_bytes") or 0)
    counted = baseline + np.cumsum(delta)
    return max([baseline] + ([int(counted.max())] if len(counted) else []))


def report_problems(run: Path, report: dict, expected_peak: int | None) -> list[str]:
    peak = report["peak"]["allocated_bytes"]
    found = []
    if expected_peak is not None and peak != expected_peak:
        found.append(f"peak {peak} is not the replay {expected_peak}")
    for m in report["modules"]:
        if m["peak_contribution_bytes"] > peak:
            found.append(f"module {m['module']} holds {m['peak_contribution_bytes']} at a peak of {peak}")
    total = sum(c["total_bytes"] for c in report["categories"])
    if total != peak:
        found.append(f"categories at the peak add up to {total}, not {peak}")
    return found


# -- running cases --------------------------------------------------------------------------


EXITS: dict[str, int] = {}  # "verb rc" -> how many times


def run_cli(args: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(args)
        except SystemExit as exc:
            rc = exc.code if isinstance(exc.code, int) else 2
    key = f"{args[0]} {rc}" + (" warned" if '"warnings"' in out.getvalue() else "")
    EXITS[key] = EXITS.get(key, 0) + 1
    return rc, out.getvalue(), err.getvalue()


def check_case(args: list[str], run_for_replay: Path | None, expected_peak=None) -> list[str]:
    rc, out, err = run_cli(args)
    if rc == 2:
        lines = err.strip().splitlines()
        if len(lines) != 1 or not lines[0].startswith("vramscope: error:"):
            return [f"exit 2 without one error line: {err[-300:]!r}"]
        return []
    if rc != 0:
        return [f"exit {rc}: {err[-300:]!r}"]
    report = json.loads(out)
    if isinstance(report, list):  # no run there (meta.json broken), but runs below it: a listing
        return []
    if run_for_replay is not None:
        try:
            expected_peak = replayed_peak(run_for_replay)
        except Exception:  # noqa: BLE001 - the reader read it some way the plain replay cannot
            expected_peak = None
    return report_problems(run_for_replay or Path(args[1]), report, expected_peak)


def mutation_case(seed: int, tmp: Path) -> tuple[str, list[str]]:
    rnd = random.Random(seed)
    run = tmp / f"run-{seed}"
    shutil.copytree(BASE, run)
    chosen = [rnd.choice(MUTATIONS) for _ in range(rnd.randint(1, 3))]
    for mutate in chosen:
        with contextlib.suppress(OSError):
            mutate(rnd, run)
    replay_source = run if (run / "events.parquet").is_file() and not (run / "events.parquet").is_symlink() else None
    label = f"seed {seed} ({', '.join(m.__name__ for m in chosen)})"
    return label, check_case(["report", str(run), "--json"], replay_source)


def pickle_case(name: str, value, tmp: Path) -> tuple[str, list[str]]:
    path = tmp / f"{name}.pickle"
    path.write_bytes(hostile_pickles.hostile_bytes(value))
    out = tmp / f"imported-{name}"
    rc, _, err = run_cli(["import", str(path), "--out", str(out)])
    if rc == 2:
        lines = err.strip().splitlines()
        ok = len(lines) == 1 and lines[0].startswith("vramscope: error:")
        return f"pickle {name}", [] if ok else [f"exit 2 without one error line: {err[-300:]!r}"]
    if rc != 0:
        return f"pickle {name}", [f"import exit {rc}: {err[-300:]!r}"]
    (run,) = out.iterdir()
    meta = json.loads((run / "meta.json").read_text())
    return f"pickle {name}", check_case(["report", str(run), "--json"], None, meta["max_allocated_bytes"])


def _alarm(signum, frame):
    raise Hang()


def run_all(first: int, count: int, pickles: tuple[int, int]) -> dict:
    signal.signal(signal.SIGALRM, _alarm)
    signal.signal(signal.SIGPROF, _alarm)
    failures: dict[str, list[str]] = {"traceback": [], "hang": [], "wrong": []}
    cases = 0
    named = list(hostile_pickles.hostile_snapshots().items())[pickles[0] : pickles[1]]
    jobs = [(lambda s=s, t=None: mutation_case(s, t)) for s in range(first, first + count)]
    jobs += [(lambda n=n, v=v, t=None: pickle_case(n, v, t)) for n, v in named]
    for job in jobs:
        with tempfile.TemporaryDirectory() as tmp:
            cases += 1
            signal.setitimer(signal.ITIMER_PROF, CASE_CPU_SECONDS)
            signal.alarm(CASE_WALL_SECONDS)
            try:
                label, problems = job(t=Path(tmp))
                failures["wrong"] += [f"{label}: {p}" for p in problems]
            except Hang:
                failures["hang"].append(f"case {cases}")
            except BaseException:  # noqa: BLE001 - anything escaping main is a failure to report
                failures["traceback"].append(traceback.format_exc(limit=-3))
            finally:
                signal.setitimer(signal.ITIMER_PROF, 0)
                signal.alarm(0)
    return {"cases": cases, "mutations": count, "pickles": len(named), "exits": EXITS, **failures}


def _args() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--first", type=int, default=0)
    parser.add_argument("--count", type=int, default=250)
    parser.add_argument("--pickles", default="0:0", help="a slice of hostile_pickles.hostile_snapshots(), as a:b")
    parser.add_argument("--memory-gib", type=float, default=3.0)
    return parser.parse_args()


if __name__ == "__main__":
    args = _args()
    limit = int(args.memory_gib * (1 << 30))
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    a, b = (int(x) for x in args.pickles.split(":"))
    print(json.dumps(run_all(args.first, args.count, (a, b))))
