"""Predict the largest batch size (or sequence length) that fits, from runs of one setup at two or more.

Each category's bytes at the allocated peak are fitted as fixed + slope x batch
(least squares; exact through two runs). Reserved memory is the fitted allocated
bytes times the largest reserved/allocated ratio the runs measured (allocator
rounding, cached blocks, fragmentation). The budget is the device memory (meta's
device_total_bytes, or --device-memory) less --margin for what the allocator cannot
see (CUDA context, library workspaces).

    vramscope whatif RUN_B4 RUN_B8 --device-memory 80GiB
    vramscope whatif RUN_S512 RUN_S1024 --axis seq --json
"""

from __future__ import annotations

import argparse
import json

NAME = "whatif"
HELP = __doc__.splitlines()[0]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run directories (holding meta.json)")
    parser.add_argument(
        "--device-memory", metavar="SIZE", help="the card's memory, e.g. 80GiB (default: meta's device_total_bytes)"
    )
    parser.add_argument(
        "--margin",
        metavar="SIZE",
        default="1GiB",
        help="kept free for the CUDA context and workspaces the allocator cannot see (default 1GiB)",
    )
    parser.add_argument(
        "--axis",
        choices=["batch", "seq"],
        default="batch",
        help="what varies between the runs: batch_size or seq_len (default batch)",
    )
    parser.add_argument(
        "--values",
        metavar="X,Y,...",
        help="the batch sizes (or seq lens) of the runs, in order, for runs whose config does not record them",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead")


def run(args: argparse.Namespace) -> int:
    from profiler.trace import meta as trace_meta
    from profiler.trace.summary_cache import load_summary
    from profiler.whatif import DEFAULT_MARGIN_BYTES, WhatIfError, parse_size, point_from_summary, whatif

    values = _values(args.values, len(args.runs), WhatIfError)
    points = []
    for run_dir, x in zip(args.runs, values):
        meta = trace_meta.read_meta_lenient(run_dir) or {}
        points.append(point_from_summary(load_summary(run_dir), args.axis, x=x, meta=meta))
    device_memory = parse_size(args.device_memory) if args.device_memory else None
    margin = parse_size(args.margin) if args.margin is not None else DEFAULT_MARGIN_BYTES
    result = whatif(points, axis=args.axis, device_memory=device_memory, margin=margin)
    if args.json:
        print(json.dumps(result, indent=1, sort_keys=True))
    else:
        print(format_result(result))
    return 0


def _values(text, n, error):
    if not text:
        return [None] * n
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise error(f"--values: expected whole numbers separated by commas, got {text!r}") from None
    if len(vals) != n or any(v <= 0 for v in vals):
        raise error(f"--values: expected {n} positive whole numbers (one per run), got {text!r}")
    return vals


def _gib(n) -> str:
    return f"{n / (1 << 30):,.3f} GiB"


def _mib(n) -> str:
    return f"{n / (1 << 20):,.1f} MiB" if abs(n) >= 1 << 20 else f"{n / (1 << 10):,.1f} KiB"


def format_result(r: dict) -> str:
    key = r["key"]
    lines = ["measured runs:"]
    for p in r["runs"]:
        reserved = _gib(p["reserved_bytes"]) if p["reserved_bytes"] else "n/a"
        err = f" ({p['fit_error'] * 100:+.2f}%)" if p["fit_error"] is not None else ""
        lines.append(
            f"  {key}={p[key]:<6} allocated {_gib(p['allocated_bytes'])}  reserved {reserved}  "
            f"ratio {p['ratio']:.4f}  fit {_gib(p['fit_allocated_bytes'])}{err}"
        )
    lines += [
        "",
        f"fitted model at the peak: bytes = fixed + slope x {key}",
        f"  {'category':<16}{'fixed':>16}{'slope / unit':>18}",
    ]
    cats = sorted(r["categories"].items(), key=lambda kv: -abs(kv[1]["slope_bytes"]) - abs(kv[1]["fixed_bytes"]))
    for name, c in cats:
        if c["fixed_bytes"] == 0 and c["slope_bytes"] == 0:
            continue
        lines.append(f"  {name:<16}{_mib(c['fixed_bytes']):>16}{_mib(c['slope_bytes']):>18}")
    lines.append(f"  {'total':<16}{_mib(r['fixed_bytes']):>16}{_mib(r['slope_bytes']):>18}")
    lines += [
        "",
        f"reserved = allocated x {r['overhead_ratio']:.4f} (largest measured reserved/allocated)",
        f"device memory {_gib(r['device_memory_bytes'])} ({r['device_memory_source']}) - margin "
        f"{_gib(r['margin_bytes'])} = budget {_gib(r['budget_bytes'])}",
        "",
    ]
    for label, pred in (
        ("largest that fits", r["at_largest"]),
        (f"{round((r['over_factor'] - 1) * 100)}% larger", r["at_over"]),
    ):
        lines.append(
            f"{label:<18} {key}={pred[key]:<6} predicted peak allocated {_gib(pred['allocated_bytes'])}"
            f", reserved {_gib(pred['reserved_bytes'])} "
            f"({pred['reserved_fraction_of_device'] * 100:.1f}% of the device)"
        )
    return "\n".join(lines)
