"""Decode speed: ms per token for a KV-cache decode, with and without capture.

    python bench/decode.py [--preset gpt2-small] [--batch 32] [--prompt 128] [--tokens 128]

Greedy decode with the SDPA backend pinned (flash / memory-efficient on CUDA; see
shared/GPU_NOTES.md for the cuDNN plan trap). The target from the workloads issue:
gpt2-small at batch 32 with the preallocated cache in at most 5 ms/token on an H100.
Each line is the median ms/token of the decode steps (the prefill is excluded),
and the capture ratio is measured in the same process.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import profiler  # noqa: E402
from workloads.infer import InferConfig, build_model, greedy_decode, make_decoder, make_prompt, sdpa_backends  # noqa: E402


def decode_ms(cfg: InferConfig, model, prompt, tokens: int, capture: bool) -> float:
    times: list[float] = []
    cuda = torch.device(cfg.device).type == "cuda"
    ctx = profiler.profile(out=tempfile.mkdtemp(), name="decode-bench") if capture else contextlib.nullcontext()
    with ctx as prof, torch.no_grad(), sdpa_backends(cfg.device):
        cache, forward = make_decoder(cfg, model)

        def after_step():
            if prof is not None:
                if cache is not None:
                    profiler.record_kv(cache)
                prof.step()

        greedy_decode(
            forward,
            prompt,
            tokens,
            recompute=cache is None,
            after_step=after_step,
            times=times,
            sync=torch.cuda.synchronize if cuda else None,
        )
    return statistics.median(times) * 1e3


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="gpt2-small")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--kv", nargs="+", default=["prealloc", "concat", "paged"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    print(
        f"device: {torch.cuda.get_device_name() if args.device == 'cuda' else 'cpu'}  "
        f"torch {torch.__version__}  preset {args.preset}  batch {args.batch}  "
        f"prompt {args.prompt}  tokens {args.tokens}"
    )
    print(f"{'kv cache':10s} {'ms/token':>9s} {'captured':>9s} {'ratio':>6s}")
    for kv in args.kv:
        cfg = InferConfig.from_toggles(
            args.preset,
            {"kv": kv, "batch": args.batch, "prompt_len": args.prompt},
            steps=args.tokens,
            device=args.device,
        )
        model = build_model(cfg)
        prompt = make_prompt(cfg)
        decode_ms(cfg, model, prompt, 8, capture=False)  # warm-up: kernels, plans
        plain = decode_ms(cfg, model, prompt, args.tokens, capture=False)
        captured = decode_ms(cfg, model, prompt, args.tokens, capture=True)
        print(f"{kv:10s} {plain:9.2f} {captured:9.2f} {captured / plain:5.2f}x")
        del model
    return 0


if __name__ == "__main__":
    sys.exit(main())
