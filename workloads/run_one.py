"""Run one ablation configuration in this process and write its result as JSON.

    python -m workloads.run_one --kind train|infer|dist --preset NAME --toggles JSON \
        --out DIR --name NAME --steps N --result FILE [--device cpu|cuda|auto]

The contract is workloads/interface.md. The exit code is 0 whenever a result was
written, also for status oom or error: the result says what happened, and the
runner reads the result rather than the exit code. Only a result that cannot be
written at all gives a non-zero exit.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import traceback

from profiler.errors import one_line
from profiler.trace.files import atomic_write

KINDS = {"train": "workloads.train", "infer": "workloads.infer", "dist": "workloads.distributed"}
STATUSES = ("ok", "oom", "error")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m workloads.run_one", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--kind", choices=sorted(KINDS), required=True)
    parser.add_argument("--preset", required=True)
    parser.add_argument("--toggles", type=json.loads, default={}, help="a JSON object")
    parser.add_argument("--out", required=True, help="directory the trace goes under")
    parser.add_argument("--name", required=True, help="the run's name")
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--result", required=True, help="where the result JSON goes")
    args = parser.parse_args(argv)
    if not isinstance(args.toggles, dict):
        parser.error("--toggles must be a JSON object")
    return args


def _is_oom(exc: BaseException) -> bool:
    # torch.OutOfMemoryError where torch has it; the message where an op re-raised it plainly.
    return type(exc).__name__ == "OutOfMemoryError" or "out of memory" in str(exc).lower()


def execute(args: argparse.Namespace) -> dict:
    """The workload's result dict; any exception it lets out becomes status oom or error."""
    try:
        workload = importlib.import_module(KINDS[args.kind])  # lazily: only the kind asked for
        result = workload.run(
            args.preset, dict(args.toggles), out=args.out, name=args.name, steps=args.steps, device=args.device
        )
    except Exception as exc:  # noqa: BLE001 - the runner wants a row, not a traceback
        traceback.print_exc(file=sys.stderr)  # the runner keeps the tail for diagnosis
        return {"status": "oom" if _is_oom(exc) else "error", "error": one_line(exc)}
    if not isinstance(result, dict):
        return {"status": "error", "error": f"run() returned {type(result).__name__}, not a dict"}
    if result.get("status") not in STATUSES:
        return {
            **result,
            "status": "error",
            "error": result.get("error") or f"run() returned status {result.get('status')!r}",
        }
    return result


def write_result(path, result: dict) -> None:
    """JSON to `path`, atomically: the runner never reads half a file."""
    atomic_write(path, json.dumps(result, indent=1, default=str))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = execute(args)
    # Under torchrun every rank runs this; each returns the whole job's result
    # (workloads.distributed gathers the ranks'), and rank 0 writes it.
    if os.environ.get("RANK", "0") == "0":
        write_result(args.result, result)
    if args.kind == "dist":
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    code = main()
    if "RANK" in os.environ:  # under torchrun: see exit_rank, a rank must not tear down gloo threads at exit
        from workloads.distributed import exit_rank

        exit_rank(code)
    sys.exit(code)
