"""Run a workload under many toggle settings, one process each, and tabulate memory and speed.

    vramscope ablate --preset tiny --suite seeds
    vramscope ablate --suite kv --steps 8 --device cuda
    vramscope ablate --suite seeds --vary precision=fp32,bf16 --vary checkpointing=off,full

--suite seeds trains with the baseline (fp32, AdamW, nothing else on) and then each
optimization alone and a few combinations; --suite kv generates with each KV cache
layout, the baseline being a torch.cat cache. --vary KEY=A,B,... replaces the suite's
rows with the product of the values given (the first combination is the baseline);
--set KEY=VALUE sets a toggle in every row ("off" or "none" unsets it). Rows that need
CUDA are skipped on the CPU, with the reason.

Memory saved % is of peak allocated bytes against the baseline (positive = less); speed
change % is of tokens/s (positive = faster). The table is also written as
<out>/ablation-<suite>-<stamp>.parquet. --json prints the same rows as one object.
--jobs N runs N configurations at a time: peaks stay exact (each run is its own
process), but step times then include the other runs' load.
"""

from __future__ import annotations

import argparse
import json
import sys

from profiler.errors import UsageError
from profiler.presets import PRESETS, unknown_preset
from profiler.report import plain as _plain
from profiler.units import human_bytes
from workloads.suites import SUITES, coerce

NAME = "ablate"
HELP = __doc__.splitlines()[0]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="tiny", help="model preset (default: tiny)")
    suites = "; ".join(f"{name}: {suite.about}" for name, suite in SUITES.items())
    parser.add_argument("--suite", choices=tuple(SUITES), default="seeds", help=f"{suites} (default: seeds)")
    parser.add_argument(
        "--vary",
        action="append",
        default=[],
        metavar="KEY=A,B,...",
        help="run every combination of these toggle values instead of the suite's rows (repeatable)",
    )
    parser.add_argument(
        "--set",
        dest="fixed",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set a toggle in every row (repeatable)",
    )
    parser.add_argument(
        "--steps",
        type=_positive(int),
        default=5,
        metavar="N",
        help="training steps or decoded tokens per run (default: 5)",
    )
    parser.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="where the runs happen (default: auto, CUDA when available)",
    )
    parser.add_argument("--out", default="traces", help="directory for the runs and the table (default: traces)")
    parser.add_argument(
        "--timeout",
        type=_positive(float),
        default=600.0,
        metavar="S",
        help="seconds one run may take before it is stopped (default: 600)",
    )
    parser.add_argument(
        "--jobs",
        type=_positive(int),
        default=1,
        metavar="N",
        help="runs at a time (default: 1); memory stays exact, step times do not",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")


def _positive(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = 0
        if not value > 0:
            raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its message
    return parse


def parse_fixed(items: list[str]) -> dict:
    """["precision=bf16", "accumulation=4"] -> {"precision": "bf16", "accumulation": 4}."""
    fixed = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--set expects KEY=VALUE, got {item!r}")
        if key in fixed:
            raise UsageError(f"--set {key} given twice")
        fixed[key.strip()] = coerce(value.strip())
    return fixed


def parse_vary(items: list[str]) -> dict[str, list]:
    """["precision=fp32,bf16"] -> {"precision": ["fp32", "bf16"]}; "off" is None (the toggle unset)."""
    axes: dict[str, list] = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip()
        words = [w.strip() for w in values.split(",")]
        if not sep or not key or not any(words):
            raise UsageError(f"--vary expects KEY=A,B,..., got {item!r}")
        if key in axes:
            raise UsageError(f"--vary {key} given twice; list all its values in one --vary")
        values = [coerce(w) for w in words if w]
        if len(set(map(repr, values))) != len(values):
            raise UsageError(f"--vary {key} repeats a value: {values}")
        axes[key] = values
    return axes


def _check(args, vary: dict, fixed: dict) -> str:
    """Usage errors found before any run starts; the device the runs will use."""
    from workloads.ablate import configurations, resolve_device

    if args.preset not in PRESETS:
        raise UsageError(unknown_preset(args.preset))
    both = sorted(set(vary) & set(fixed))
    if both:
        raise UsageError(f"toggle {both[0]!r} is given to both --vary and --set")
    device = resolve_device(args.device)
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UsageError("--device cuda, but torch sees no CUDA device here")
    try:  # unknown toggles, before the first run rather than as a failed row each
        configurations(args.suite, vary=vary, fixed=fixed, preset=args.preset, steps=args.steps, device=device)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return device


def run(args: argparse.Namespace) -> int:
    from workloads.ablate import run_suite

    vary, fixed = parse_vary(args.vary), parse_fixed(args.fixed)
    device = _check(args, vary, fixed)
    progress = make_progress()  # on stderr, so --json output stays one object
    result = run_suite(
        args.suite,
        preset=args.preset,
        steps=args.steps,
        device=device,
        out=args.out,
        vary=vary,
        fixed=fixed,
        timeout=args.timeout,
        jobs=args.jobs,
        progress=progress,
    )
    if args.json:
        print(
            json.dumps(
                _plain(
                    {
                        **result.meta,
                        "path": str(result.path),
                        "seconds": result.seconds,
                        "rows": result.table.to_dict("records"),
                    }
                ),
                indent=1,
            )
        )
    else:
        m = result.meta
        print(
            f"vramscope ablate: suite {m['suite']}, preset {m['preset']}, device {m['device']}, "
            f"{m['steps']} steps: {len(result.table)} configurations in {result.seconds:.1f} s"
        )
        if m["jobs"] > 1:
            print(f"  ({m['jobs']} runs at a time: step times and speed changes are of runs sharing the machine)")
        print(render(result.table))
        print(f"\ntable: {result.path}")
    return 0


# -- progress ---------------------------------------------------------------------------


class PlainProgress:
    """One line per finished run on stderr: readable in CI logs, where a live bar is noise."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.total = 0
        self.count = 0

    def start(self, configs) -> None:
        self.total, self.count = len(configs), 0
        self._width = max((len(c.name) for c in configs), default=0)

    def done(self, config, row, seconds: float) -> None:
        self.count += 1
        n = len(str(self.total))
        print(
            f"[{self.count:>{n}}/{self.total}] {config.name:<{self._width}}  {row['status']:<7}  {seconds:6.1f} s",
            file=self.stream,
            flush=True,
        )

    def close(self) -> None:
        pass


class RichProgress:
    """A live bar (rich), for a terminal; finished runs are printed above it."""

    def __init__(self):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self._progress = Progress(
            TextColumn("ablate"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), transient=True
        )
        self._task = None

    def start(self, configs) -> None:
        self._progress.start()
        self._task = self._progress.add_task("ablate", total=len(configs))

    def done(self, config, row, seconds: float) -> None:
        self._progress.console.print(f"{config.name}: {row['status']} ({seconds:.1f} s)", highlight=False)
        self._progress.advance(self._task)

    def close(self) -> None:
        self._progress.stop()


def make_progress():
    """A rich bar on a terminal when rich is installed, else one plain line per run."""
    if sys.stderr.isatty():
        try:
            return RichProgress()
        except ImportError:
            pass
    return PlainProgress()


# -- the text -----------------------------------------------------------------------------


def _pct(value) -> str:
    return "" if value is None or value != value else f"{value:+.1f}%"


def _num(value, fmt: str) -> str:
    return "" if value is None or value != value else format(value, fmt)


def _cell(value) -> str:
    return "-" if value is None or value != value else str(value)


def _bytes(value) -> str:
    return "" if value is None or value != value else human_bytes(int(value))


_COLUMNS = [  # header, column, format; a column that no row has a value in is left out
    ("peak alloc", "peak_allocated_bytes", _bytes),
    ("peak reserved", "peak_reserved_bytes", _bytes),
    ("frag", "fragmentation_ratio_at_peak", lambda v: _num(v, ".1%")),
    ("step ms", "median_step_ms", lambda v: _num(v, ",.1f")),
    ("tokens/s", "tokens_per_s", lambda v: _num(v, ",.0f")),
    ("mem saved", "memory_saved_pct", _pct),
    ("speed", "speed_change_pct", _pct),
    ("loss", "loss", lambda v: _num(v, ".4f")),
    ("loss diff", "loss_delta", lambda v: _num(v, "+.4f")),
]


def render(table) -> str:
    """The ablation table (workloads.ablate.build_table) as aligned text, then the reasons for
    rows that did not finish. Toggles show as their values, "-" where off."""
    if len(table) == 0:
        return "no configurations"
    from profiler.report import text_table as _table

    records = table.astype(object).where(table.notna(), None).to_dict("records")
    toggles = [c for c in table.columns if c.startswith("config.")]
    shown = [(h, c, f) for h, c, f in _COLUMNS if c in table and table[c].notna().any()]
    head = ["name", *(c.removeprefix("config.") for c in toggles), "status", *(h for h, _, _ in shown)]
    rows = []
    for r in records:
        cells = [r["name"], *(_cell(r[c]) for c in toggles), r["status"]]
        rows.append(cells + [f(r[c]) for _, c, f in shown])
    right = set(range(len(toggles) + 2, len(head)))
    lines = _table(head, rows, right)
    notes = [(r["name"], r["status"], r["note"]) for r in records if r.get("note")]
    if notes:
        width = max(len(n) for n, _, _ in notes)
        lines += [""] + [f"  {name:<{width}}  {status}: {note}" for name, status, note in notes]
    return "\n".join(lines)
