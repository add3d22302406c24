"""Predict memory per category from an analytic model, or compare a run with the prediction.

    vramscope estimate --preset gpt2-small --batch 8 --seq 1024 --precision bf16 --optimizer adamw
    vramscope estimate --preset gpt2-small --checkpointing full --json
    vramscope estimate --trace RUN

The model (profiler/estimate.py) is Korthikanti et al. 2022 adjusted for no dropout,
flash/SDPA attention, autocast and checkpointing, plus parameters, gradients, optimizer
state, logits and KV cache. The cuBLAS workspace is counted for CUDA runs only.

--trace works on any run. Parameters, gradients and optimizer state are predicted from
the run's own tensors (profiler/estimate_trace.py) and measured as their categories'
maxima. Activations are compared with the formulas, per category at the peak and per
block, where the model's shape is known: a preset in the run's config, or --preset /
--hf-config given here (then --batch and --seq, else the run's batch_size and seq_len,
and --precision, --optimizer, --checkpointing, --accumulation describe the run). Without
a shape, the activations each module kept for backward are listed, measured only.
"""

from __future__ import annotations

import argparse
import json

from profiler.errors import UsageError

NAME = "estimate"
HELP = __doc__.splitlines()[0]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from profiler.estimate import OPTIMIZERS, PRECISION_BYTES

    parser.add_argument("--preset", default=None, help="model preset (default: gpt2-small; with --trace: the run's)")
    parser.add_argument("--hf-config", default=None, help="a transformers config name or path instead of --preset")
    parser.add_argument("--batch", type=int, default=None, help="sequences per optimizer step (default: the preset's)")
    parser.add_argument("--seq", type=int, default=None, help="tokens per sequence (default: the preset's)")
    parser.add_argument("--precision", choices=tuple(PRECISION_BYTES), default="fp32")
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw")
    parser.add_argument("--checkpointing", default=None, help="full, every:k or selective")
    parser.add_argument("--accumulation", type=int, default=1)
    parser.add_argument("--kv-tokens", type=int, default=0, help="tokens of KV cache to add")
    parser.add_argument("--trace", default=None, metavar="RUN", help="compare a run with the prediction")
    parser.add_argument("--top", type=int, default=20, metavar="N", help="with --trace and no shape: modules listed")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    if args.trace:
        return _compare_with_run(args)
    return _predict(args)


def _compare_with_run(args: argparse.Namespace) -> int:
    """Measured vs predicted for the run at --trace, as a table or JSON."""
    from profiler import estimate as model
    from profiler.estimate_trace import compare_with_trace
    from profiler.trace.reader import load_trace
    from profiler.units import human_bytes

    trace = load_trace(args.trace)
    kw, no_shape = _shape_for_run(args, trace.meta)
    try:
        est = None if kw is None else model.estimate(**kw, detail=True)
    except ValueError as exc:
        raise UsageError(f"{args.trace}: {exc}") from None
    table = compare_with_trace(trace, est, top=args.top)
    if args.json:
        rows = table.astype(object).where(table.notna(), None).to_dict("records")
        print(json.dumps({"run": str(args.trace), "no_shape": no_shape, "rows": rows}, indent=1, default=str))
        return 0
    if no_shape:
        print(
            f"{args.trace}: no model shape ({no_shape}): activations are listed per module, measured only; "
            "parameters, gradients and optimizer state are predicted from the run's own tensors"
        )
    print(f"{'level':<8} {'name':<16} {'measured':>10} {'predicted':>10} {'error':>8}  why")
    for r in table.itertuples():
        err = "" if r.error_pct != r.error_pct else f"{r.error_pct:+6.1f}%"
        known = r.predicted_bytes is not None and r.predicted_bytes == r.predicted_bytes  # not None, not NaN
        predicted = human_bytes(int(r.predicted_bytes)) if known else "-"
        print(
            f"{r.level:<8} {r.name:<16} {human_bytes(r.measured_bytes):>10} {predicted:>10} {err:>8}  {r.explanation}"
        )
    return 0


def _shape_for_run(args: argparse.Namespace, meta: dict) -> tuple[dict | None, str | None]:
    """estimate() keyword arguments for the run, or None and why there is no model shape for it."""
    from profiler import estimate as model

    if not (args.preset or args.hf_config):
        try:
            return model.config_from_meta(meta), None
        except ValueError as exc:
            return None, str(exc)
    recorded = meta.get("config")
    config = recorded if isinstance(recorded, dict) else {}
    try:
        if args.hf_config:
            shape, batch, seq = model.shape_from_hf(args.hf_config), None, None
        else:
            from profiler.presets import PRESETS

            shape = model.shape_from_preset(args.preset)
            batch, seq = PRESETS[args.preset].batch_size, PRESETS[args.preset].seq_len
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    batch = args.batch or config.get("batch_size") or batch
    seq = args.seq or config.get("seq_len") or seq
    if not (batch and seq):
        raise UsageError("--batch and --seq are needed: the run's config records no batch_size and seq_len")
    return dict(
        model_cfg=shape,
        batch=int(batch),
        seq=int(seq),
        precision=args.precision,
        optimizer=args.optimizer,
        checkpointing=args.checkpointing,
        accumulation=args.accumulation,
        workspace_bytes=model.workspace_bytes_for(meta),
    ), None


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

            name = args.preset or "gpt2-small"
            shape = model.shape_from_preset(name)
            batch = args.batch or PRESETS[name].batch_size
            seq = args.seq or PRESETS[name].seq_len
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
