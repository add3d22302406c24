"""Continuous batching: where a server's KV memory goes, contiguous slots vs paged blocks.

    python -m workloads.serving --device cpu

A seeded stream of requests (mixed prompt and output lengths, random arrival
times) is served twice by the same greedy decode of a GPT: once with a
contiguous reservation of max_len positions per slot (`max_batch` slots,
allocated at start, as static-cache servers do) and once with paged blocks
allocated on demand. After every decode step the KV memory is split into
  token_state   bytes holding real K/V token states,
  unused        reserved positions no token fills (the rest of each slot, idle slots),
  frag          the unfilled tail of each sequence's last block (paged only),
and, on CUDA, the allocator's reserved-but-unallocated bytes (reserved minus
allocated, over all memory, not only KV); each is then averaged over the steps.
"""

from __future__ import annotations

import argparse
import random
import time
from collections import deque
from dataclasses import dataclass, field

import torch

import profiler
from workloads.infer import kv_spec, sdpa_backends, with_kv_path
from workloads.kv import BlockPool, KVCache, PagedCache, PreallocCache, RaggedBatch
from workloads.model import GPT
from workloads.model import preset as gpt_preset

MODES = ("contiguous", "paged")
BUCKETS = ("token_state_bytes", "unused_bytes", "frag_bytes", "allocator_free_bytes")


@dataclass(kw_only=True, slots=True)
class ServingConfig:
    preset: str = "tiny"
    """GPT preset; its block_size is the max_len each contiguous slot reserves."""
    device: str = "cpu"
    requests: int = 24
    """Requests in the stream."""
    max_batch: int = 6
    """Sequences decoded together at most (contiguous slots)."""
    block_size: int = 16
    """Tokens per paged block."""
    arrival_rate: float = 0.75
    """Mean requests arriving per decode step (exponential gaps)."""
    prompt_frac: tuple[float, float] = (0.05, 0.4)
    """Prompt length range, as fractions of max_len."""
    output_frac: tuple[float, float] = (0.05, 0.45)
    """Output length range (tokens generated, the prefill's included), as fractions of max_len."""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.prompt_frac[1] + self.output_frac[1] > 1:
            raise ValueError("the longest prompt plus the longest output must fit max_len")
        if min(self.requests, self.max_batch, self.block_size) < 1 or self.arrival_rate <= 0:
            raise ValueError(f"requests, max_batch, block_size and arrival_rate must be positive: {self}")

    @property
    def max_len(self) -> int:
        return gpt_preset(self.preset).block_size

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if torch.device(self.device).type == "cuda" else torch.float32


@dataclass(slots=True)
class Request:
    id: int
    arrival: int  # the step at which it may be admitted
    prompt: torch.Tensor  # (1, P)
    output_len: int


@dataclass(slots=True)
class _Live:
    req: Request
    cache: KVCache
    out: list = field(default_factory=list)  # generated tokens, each (1, 1)


def make_requests(cfg: ServingConfig) -> list[Request]:
    rng = random.Random(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    vocab, n = gpt_preset(cfg.preset).vocab_size, cfg.max_len
    span = lambda lo, hi: rng.randint(max(1, int(lo * n)), max(1, int(hi * n)))  # noqa: E731
    t, reqs = 0.0, []
    for i in range(cfg.requests):
        prompt = torch.randint(vocab, (1, span(*cfg.prompt_frac)), generator=gen)
        reqs.append(Request(i, int(t), prompt.to(cfg.device), span(*cfg.output_frac)))
        t += rng.expovariate(cfg.arrival_rate)
    return reqs


def build_model(cfg: ServingConfig):
    torch.manual_seed(cfg.seed)
    with torch.device(cfg.device):
        return with_kv_path(GPT(gpt_preset(cfg.preset))).to(cfg.dtype).eval()


class _Server:
    """Owns the KV memory of one mode: slots, or a block pool."""

    def __init__(self, mode: str, cfg: ServingConfig, spec) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
        self.mode, self.cfg, self.spec = mode, cfg, spec
        self.free_slots: list[PreallocCache] = []
        self.pool = None
        if mode == "contiguous":
            self.free_slots = [PreallocCache(spec, 1, cfg.max_len) for _ in range(cfg.max_batch)]
        else:
            self.pool = BlockPool(spec, cfg.block_size)
        self.live: list[_Live] = []

    def open(self) -> KVCache:
        if self.mode == "contiguous":
            slot = self.free_slots.pop()
            slot.reset()
            return slot
        return PagedCache(self.spec, 1, self.cfg.block_size, self.pool)

    def close(self, cache: KVCache) -> None:
        if self.mode == "contiguous":
            self.free_slots.append(cache)
        else:
            cache.release()

    def kv_stats(self) -> dict:
        """The KV protocol over every cache held, idle slots included."""
        caches = [x.cache for x in self.live] + self.free_slots
        rows = [c.kv_stats() for c in caches]
        return dict(
            batch=len(self.live),
            tokens=max((x.cache.tokens for x in self.live), default=0),
            token_state_bytes=sum(r["token_state_bytes"] for r in rows),
            reserved_bytes=sum(r["reserved_bytes"] for r in rows),
            extra_bytes=0,
        )

    def sample(self) -> dict:
        s = self.kv_stats()
        slack = s["reserved_bytes"] - s["token_state_bytes"]
        row = dict(
            token_state_bytes=s["token_state_bytes"],
            unused_bytes=slack if self.mode == "contiguous" else 0,
            frag_bytes=slack if self.mode == "paged" else 0,
            reserved_bytes=s["reserved_bytes"],
            allocator_free_bytes=None,
        )
        if torch.device(self.cfg.device).type == "cuda":
            m = torch.cuda.memory_stats(self.cfg.device)
            row["allocator_free_bytes"] = m["reserved_bytes.all.current"] - m["allocated_bytes.all.current"]
        return row


def serve(model, requests: list[Request], mode: str, cfg: ServingConfig, *, record: bool = False):
    """Serve the stream; returns (samples: one dict per step, outputs: request id -> tokens (1, n))."""
    server = _Server(mode, cfg, kv_spec(model, cfg.device, cfg.dtype))
    waiting = deque(sorted(requests, key=lambda r: r.arrival))
    samples, outputs, step = [], {}, 0
    while waiting or server.live:
        while waiting and waiting[0].arrival <= step and len(server.live) < cfg.max_batch:
            req = waiting.popleft()
            cache = server.open()
            tok = model(req.prompt, cache)[:, -1].argmax(-1, keepdim=True)  # prefill alone
            server.live.append(_Live(req, cache, [tok]))
        decoding = [x for x in server.live if len(x.out) < x.req.output_len]
        if decoding:
            ids = torch.cat([x.out[-1] for x in decoding])  # (B, 1)
            toks = model(ids, RaggedBatch([x.cache for x in decoding]))[:, -1].argmax(-1, keepdim=True)
            for x, t in zip(decoding, toks.split(1)):
                x.out.append(t)
        samples.append(server.sample())
        if record:
            profiler.record_kv(server, name=f"serving-{mode}")
            profiler.step()
        for x in [x for x in server.live if len(x.out) >= x.req.output_len]:
            outputs[x.req.id] = torch.cat(x.out, dim=1)
            server.close(x.cache)
            server.live.remove(x)
        step += 1
    return samples, outputs


def summarize(mode: str, samples: list[dict], outputs: dict, seconds: float) -> dict:
    n = len(samples)
    mean = {
        k: (sum(s[k] for s in samples) / n if samples[0][k] is not None else None)
        for k in BUCKETS + ("reserved_bytes",)
    }
    kv = mean["reserved_bytes"] or 1
    return dict(
        mode=mode,
        steps=n,
        requests=len(outputs),
        tokens=sum(o.shape[1] for o in outputs.values()),
        seconds=seconds,
        **{"mean_" + k: v for k, v in mean.items()},
        token_state_frac=mean["token_state_bytes"] / kv,
        unused_frac=mean["unused_bytes"] / kv,
        frag_frac=mean["frag_bytes"] / kv,
        peak_reserved_bytes=max(s["reserved_bytes"] for s in samples),
    )


def compare(cfg: ServingConfig, out: str | None = None) -> list[dict]:
    """Serve the same stream in both modes; one summary row per mode. With `out`,
    each mode is also captured as a trace (a kv row and a profiler step per decode step)."""
    model = build_model(cfg)
    requests = make_requests(cfg)
    rows, outputs = [], []
    for mode in MODES:
        # Several forwards (prefills, then a decode) make one serving step: steps end at profiler.step().
        capture = (
            profiler.profile(out=out, name=f"serving-{mode}", config=dict(serving=mode), explicit_steps=True)
            if out
            else None
        )
        t0 = time.perf_counter()
        with torch.no_grad(), sdpa_backends(cfg.device):
            if capture:
                with capture:
                    samples, got = serve(model, requests, mode, cfg, record=True)
            else:
                samples, got = serve(model, requests, mode, cfg)
        rows.append(summarize(mode, samples, got, time.perf_counter() - t0))
        if capture:
            rows[-1]["run_dir"] = str(capture.run_dir)
        outputs.append(got)
    same = all(torch.equal(outputs[0][i], outputs[1][i]) for i in outputs[0])
    for r in rows:
        r["outputs_match"] = same
    return rows


def _fmt_bytes(b) -> str:
    if b is None:
        return "n/a"
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if b >= size:
            return f"{b / size:.1f} {unit}"
    return f"{b:.0f} B"


def format_table(rows: list[dict]) -> str:
    head = (
        "mode",
        "steps",
        "tokens",
        "mean KV reserved",
        "token states",
        "unused slots",
        "last-block frag",
        "allocator free",
        "peak KV reserved",
        "tok/s",
    )
    lines = [head]
    for r in rows:
        lines.append(
            (
                r["mode"],
                str(r["steps"]),
                str(r["tokens"]),
                _fmt_bytes(r["mean_reserved_bytes"]),
                f"{r['token_state_frac']:.1%}",
                f"{r['unused_frac']:.1%}",
                f"{r['frag_frac']:.1%}",
                _fmt_bytes(r["mean_allocator_free_bytes"]),
                _fmt_bytes(r["peak_reserved_bytes"]),
                f"{r['tokens'] / r['seconds']:.0f}",
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--requests", type=int, default=24)
    p.add_argument("--max-batch", type=int, default=6)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--arrival-rate", type=float, default=0.75)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="also capture each mode as a trace under this directory")
    a = p.parse_args(argv)
    if torch.device(a.device).type == "cpu":
        torch.set_num_threads(1)  # tiny matmuls: a second intra-op thread costs more than it gives
    cfg = ServingConfig(
        preset=a.preset,
        device=a.device,
        requests=a.requests,
        max_batch=a.max_batch,
        block_size=a.block_size,
        arrival_rate=a.arrival_rate,
        seed=a.seed,
    )
    rows = compare(cfg, a.out)
    print(
        f"{cfg.requests} requests, max_batch {cfg.max_batch}, max_len {cfg.max_len}, "
        f"block_size {cfg.block_size}, device {cfg.device}; fractions are of the mean KV reserved"
    )
    print(format_table(rows))
    print(f"greedy outputs identical across modes: {rows[0]['outputs_match']}")
    for r in rows:
        if "run_dir" in r:
            print(f"{r['mode']} trace: {r['run_dir']}")


if __name__ == "__main__":
    main()
