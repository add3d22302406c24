"""The workloads of bench/overhead.py: one function per row of the capture-cost goals.

Each row runs its workload in alternating rounds, uncaptured then captured (a fresh
`profiler.profile()` per captured round), and returns the per-step seconds of both
plus what each captured run's meta.json says (capture path, dropped events).
"""

from __future__ import annotations

import gc
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

import profiler
from workloads.infer import InferConfig, build_model, greedy_decode, make_decoder, make_prompt, sdpa_backends
from workloads.model import GPTConfig, preset
from workloads.train import build, make_batch, train_step

# (captured or not, per-round callable taking the profiler or None) -> step seconds
RoundFn = Callable[[object | None], list[float]]


def _capture(out: Path, name: str, capture_path: str, options: dict | None = None):
    return profiler.profile(out=str(out), name=name, capture_path=capture_path, **(options or {}))


def _run_facts(prof) -> dict:
    meta = json.loads((Path(prof.run_dir) / "meta.json").read_text())
    keys = ("capture_path", "capture_path_error", "events_dropped", "status", "steps_completed", "steps_from_template")
    facts = {k: meta.get(k) for k in keys}
    facts["hooked_steps"] = _hooked_steps(Path(prof.run_dir))
    return facts


def _hooked_steps(run_dir: Path) -> list[int] | None:
    """The steps that ran module hooks, from the trace's steps table (None: not readable)."""
    from profiler.errors import TraceError
    from profiler.trace.reader import load_trace

    try:
        steps = load_trace(run_dir, tables=("steps",)).steps
    except TraceError:
        return None
    return [int(s) for s in steps.loc[steps["modules_hooked"].astype(bool), "step"]]


def alternate(
    run_round: RoundFn, rounds: int, out: Path, name: str, capture_path: str, options: dict | None = None
) -> dict:
    """Alternating plain and captured rounds; one warm captured round first (tracker build,
    first snapshot), which is not timed. `options`: profile()'s other arguments."""
    with _capture(out, f"{name}-warm", capture_path, options) as prof:
        run_round(prof)
    plain: list[list[float]] = []
    captured: list[list[float]] = []
    facts: list[dict] = []
    gc_time = {"plain": GcClock(), "captured": GcClock()}
    rss0 = rss_mb()
    for _ in range(rounds):
        with gc_time["plain"]:
            plain.append(run_round(None))
        with _capture(out, name, capture_path, options) as prof, gc_time["captured"]:
            captured.append(run_round(prof))
        facts.append(_run_facts(prof))
    # After the warm round, all that is new over the rounds is what captures kept.
    return dict(
        plain=plain,
        captured=captured,
        runs=facts,
        rss_growth_over_rounds_mb=rss_mb() - rss0,
        garbage_collection={k: v.summary() for k, v in gc_time.items()},
    )


class GcClock:
    """Python's garbage collections while inside `with`: how many of each generation, and
    the seconds they took (a full collection of a process holding transformers can take
    tens of milliseconds, a stall of whatever step it lands in)."""

    def __init__(self) -> None:
        self.collections = [0, 0, 0]
        self.seconds = 0.0
        self.longest_s = 0.0
        self._started: float | None = None

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        elif self._started is not None:
            took = time.perf_counter() - self._started
            self.seconds += took
            self.longest_s = max(self.longest_s, took)
            self.collections[info.get("generation", 0)] += 1
            self._started = None

    def __enter__(self) -> GcClock:
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc) -> None:
        gc.callbacks.remove(self._callback)

    def summary(self) -> dict:
        return dict(collections=self.collections, seconds=self.seconds, longest_ms=self.longest_s * 1e3)


def rss_mb() -> float:
    """This process's resident set, from /proc (0 where there is none)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _timed(step: Callable[[], None], n: int) -> list[float]:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return times


# -- training ------------------------------------------------------------------------------
def train(steps: int, rounds: int, out: Path, capture_path: str, compiled: bool) -> dict:
    """gpt2-small, bf16 autocast, fused AdamW, B8x1024; the loss is read each step (a sync)."""
    cfg = preset("gpt2-small")
    torch.manual_seed(0)
    model, opt = build(cfg, device="cuda", fused=True)
    batch = make_batch(cfg, device="cuda")
    run = torch.compile(model) if compiled else model

    def step():
        train_step(run, opt, batch, autocast_dtype=torch.bfloat16).item()

    counts = _compile_counts()
    _timed(step, 5)  # kernels, autotuning, optimizer state; compiles here
    # Dynamo's compiles in each kind of round (the captured ones include the warm round).
    compiles = {
        "first_compile": _delta(counts),
        "plain": dict.fromkeys(counts, 0),
        "captured": dict.fromkeys(counts, 0),
    }

    def round_(prof):
        before = _compile_counts()
        times = _timed(step, steps)  # steps end at each optimizer step, as in most scripts
        into = compiles["captured" if prof is not None else "plain"]
        for k, v in _delta(before).items():
            into[k] += v
        return times

    result = alternate(round_, rounds, out, "compiled" if compiled else "train", capture_path)
    if compiled:
        result["compiles"] = compiles
    return result


def _compile_counts() -> dict:
    from torch._dynamo.utils import counters

    return dict(frames=int(counters["frames"]["total"]), graphs=int(counters["stats"]["unique_graphs"]))


def _delta(before: dict) -> dict:
    now = _compile_counts()
    return {k: now[k] - before[k] for k in before}


def _sync() -> None:
    torch.cuda.synchronize()


# -- decode ----------------------------------------------------------------------------------
def decode(kv: str, tokens: int, rounds: int, out: Path, capture_path: str, options: dict | None = None) -> dict:
    return alternate(decode_round(kv, tokens), rounds, out, f"decode-{kv}", capture_path, options)


def decode_round(kv: str, tokens: int) -> RoundFn:
    """gpt2-small KV decode at B32 after a 128-token prompt, SDPA pinned to flash/efficient;
    each decode step is one profiler step and records the cache (profiler.record_kv). A token
    is timed from one step's end to the next, so that the step's record_kv and prof.step() (and
    a drain at that step end) count, as they do in the user's loop."""
    cfg = InferConfig.from_toggles(
        "gpt2-small", {"kv": kv, "batch": 32, "prompt_len": 128}, steps=tokens, device="cuda"
    )
    model = build_model(cfg)
    prompt = make_prompt(cfg)

    def round_(prof):
        ends: list[float] = []
        with torch.no_grad(), sdpa_backends(cfg.device):
            cache, forward = make_decoder(cfg, model)

            def after_step():
                if prof is not None:
                    if cache is not None:
                        profiler.record_kv(cache)
                    prof.step()
                ends.append(time.perf_counter())

            greedy_decode(forward, prompt, tokens, recompute=False, after_step=after_step, sync=torch.cuda.synchronize)
        return [b - a for a, b in zip(ends, ends[1:])]  # the prefill's step is not a token

    round_(None)  # kernels
    return round_


# -- generate ----------------------------------------------------------------------------------
# The CPU benches' generate() model (tracker_costs, drain_costs, token_costs, soak): 12 layers
# as gpt2-small has, each of width 64, so that a token is milliseconds on the CPU machine.
CPU_SHAPE = GPTConfig(n_layer=12, n_head=2, n_embd=64, vocab_size=256, block_size=512, batch_size=4, seq_len=32)


def generate(tokens: int, rounds: int, out: Path, capture_path: str, options: dict | None = None) -> dict:
    return alternate(generate_round(tokens), rounds, out, "generate", capture_path, options)


def generate_round(tokens: int, device: str = "cuda", shape: GPTConfig | None = None, batch: int = 16) -> RoundFn:
    """transformers' generate() on a Llama-style model the size of gpt2-small (random weights,
    bf16; float32 on the CPU), B16, greedy, `tokens` new tokens; timed per token. No profiler
    steps: the capture drains on its timer, as it must for a loop that never steps. `shape`:
    another model's shape (bench/tracker_costs.py's CPU row)."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    from workloads.llama import build_llama

    gpt = shape or preset("gpt2-small")
    torch.manual_seed(0)
    model = build_llama(gpt, device, torch.bfloat16 if device == "cuda" else torch.float32)
    ids = torch.randint(gpt.vocab_size, (batch, min(128, gpt.block_size // 2)), device=device)

    class TokenClock(StoppingCriteria):
        def __init__(self):
            self.marks: list[float] = []

        def __call__(self, input_ids, scores, **kwargs):
            self.marks.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    def round_(prof):
        clock = TokenClock()
        with torch.no_grad():
            model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=tokens,
                min_new_tokens=tokens,
                do_sample=False,
                pad_token_id=0,
                stopping_criteria=StoppingCriteriaList([clock]),
            )
        if device == "cuda":
            torch.cuda.synchronize()
        return [b - a for a, b in zip(clock.marks, clock.marks[1:])]  # the prefill is not a token step

    round_(None)
    return round_


def cpu(steps: int, rounds: int) -> dict:
    """The CPU backend's row, from bench/overhead_cpu.py where it exists."""
    try:
        from bench.overhead_cpu import cpu_rows
    except ImportError as e:
        return dict(status="not run", error=f"{type(e).__name__}: {e}")
    return dict(cpu_rows(steps, rounds))


def trace_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="vramscope-overhead-"))
