"""Predict memory per category from an analytic model, or compare a run with the prediction.

    vramscope estimate --preset gpt2-small --batch 8 --seq 1024 --precision bf16 --optimizer adamw
    vramscope estimate --preset gpt2-small --checkpointing full --json
    vramscope estimate --trace RUN

The model (profiler/estimate.py) is Korthikanti et al. 2022 adjusted for no dropout,
flash/SDPA attention, autocast and checkpointing, plus parameters, gradients, optimizer
state, logits and KV cache. --trace prints measured vs predicted per category and per
block for a run whose config the model understands (else a one-line error, exit 2).
"""

from __future__ import annotations

import argparse
import json

from profiler.errors import UsageError

NAME = "estimate"
HELP = __doc__.splitlines()[0]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from profiler.estimate import OPTIMIZERS, PRECISION_BYTES

    parser.add_argument("--preset", default="gpt2-small", help="model preset (default: gpt2-small)")
    parser.add_argument("--hf-config", default=None, help="a transformers config name or path instead of --preset")
    parser.add_argument("--batch", type=int, default=None, help="sequences per optimizer step (default: the preset's)")
    parser.add_argument("--seq", type=int, default=None, help="tokens per sequence (default: the preset's)")
    parser.add_argument("--precision", choices=tuple(PRECISION_BYTES), default="fp32")
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw")
    parser.add_argument("--checkpointing", default=None, help="full, every:k or selective")
    parser.add_argument("--accumulation", type=int, default=1)
    parser.add_argument("--kv-tokens", type=int, default=0, help="tokens of KV cache to add")
    parser.add_argument("--trace", default=None, metavar="RUN", help="compare a run with the prediction")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    if args.trace:
        return _compare_with_run(args)
    return _predict(args)


def _compare_with_run(args: argparse.Namespace) -> int:
    """Measured vs predicted for the run at --trace, as a table or JSON."""
    from profiler import estimate as model
    from profiler.trace.reader import load_trace
    from profiler.units import human_bytes

    trace = load_trace(args.trace)
    try:
        kw = model.config_from_meta(trace.meta)
    except ValueError as exc:
        raise UsageError(f"{args.trace}: {exc}") from None
    table = model.measured_vs_predicted(trace, model.estimate(**kw, detail=True))
    if args.json:
        print(
            json.dumps(
                {
                    "run": str(args.trace),
                    "rows": table.astype(object).where(table.notna(), None).to_dict("records"),
                },
                indent=1,
                default=str,
            )
        )
        return 0
    for r in table.itertuples():
        err = "" if r.error_pct != r.error_pct else f"{r.error_pct:+6.1f}%"
        print(
            f"{r.level:<8} {r.name:<16} {human_bytes(r.measured_bytes):>10} {human_bytes(r.predicted_bytes):>10} "
            f"{err:>8}  {r.explanation}"
        )
    return 0


def _predict(args: argparse.Namespace) -> int:
    """The predicted bytes per category and the peak for the model and step the arguments describe."""
    from profiler import estimate as model
    from profiler.units import human_bytes

    try:
        if args.hf_config:
            shape = model.shape_from_hf(args.hf_config)
            batch, seq = args.batch or 1, args.seq or 1024
        else:
            from profiler.presets import PRESETS

            shape = model.shape_from_preset(args.preset)
            batch = args.batch or PRESETS[args.preset].batch_size
            seq = args.seq or PRESETS[args.preset].seq_len
        est = model.estimate(
            shape,
            batch=batch,
            seq=seq,
            precision=args.precision,
            optimizer=args.optimizer,
            checkpointing=args.checkpointing,
            accumulation=args.accumulation,
            kv_tokens=args.kv_tokens,
            detail=True,
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if args.json:
        print(json.dumps(est, indent=1))
        return 0
    for key in model.BREAKDOWN:
        print(f"{key:<16} {human_bytes(est[key]):>10}")
    print(f"{'peak':<16} {human_bytes(est['peak']):>10}  (phase {est['peak_phase']})")
    return 0
