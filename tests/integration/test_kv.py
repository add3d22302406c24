"""KV caches (workloads/kv) and the decode workload (workloads/infer.py) on the tiny GPT.

Byte counts are checked against the formula, not against the caches' own
arithmetic: layers x 2 x batch x kv_heads x head_dim x tokens x dtype size.
"""

from __future__ import annotations

import math

import pytest
import torch

from profiler.trace.reader import load_trace
from workloads import infer
from workloads.infer import InferConfig, build_model, greedy_decode, make_decoder, make_prompt
from workloads.kv import KINDS, KVSpec, SlidingCache, make_cache
from workloads.kv.concat import ConcatCache
from workloads.quant import Int8Linear, quantize_linears

L, H, HD, F32 = 2, 2, 32, 4  # the tiny preset: 2 layers, 2 heads of 64 / 2 channels, fp32
PROMPT, STEPS, BATCH, BLOCK = 10, 12, 3, 4  # 10 prompt tokens cross blocks of 4 unevenly


pytestmark = pytest.mark.usefixtures("one_thread")


def kv_bytes(tokens: int, batch: int = BATCH, kv_heads: int = H, layers: int = L, size: int = F32) -> int:
    return layers * 2 * batch * kv_heads * HD * tokens * size


def _decode(kind: str, steps: int = STEPS, **toggles):
    """Greedy tokens (B, steps + 1) and kv_stats after the prefill and after each step."""
    cfg = InferConfig(preset="tiny", kv=kind, steps=steps, batch=BATCH, prompt_len=PROMPT, block_size=BLOCK, **toggles)
    model = build_model(cfg)
    stats = []
    with torch.no_grad(), infer.sdpa_backends("cpu"):
        cache, forward = make_decoder(cfg, model)
        tokens = greedy_decode(
            forward,
            make_prompt(cfg),
            steps,
            recompute=cache is None,
            after_step=(lambda: stats.append(cache.kv_stats())) if cache else None,
        )
    return tokens, stats, cache


# -- bytes at every step ------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["concat", "prealloc", "paged"])
def test_token_state_bytes_exact_every_step(kind):
    _, stats, _ = _decode(kind)
    assert len(stats) == STEPS + 1
    for i, s in enumerate(stats):
        tokens = PROMPT + i
        assert (s["batch"], s["tokens"]) == (BATCH, tokens)
        assert s["token_state_bytes"] == kv_bytes(tokens)
        assert s["extra_bytes"] == 0


def test_reserved_bytes_by_kind():
    _, concat, _ = _decode("concat")
    _, prealloc, _ = _decode("prealloc", max_len=40)
    _, paged, cache = _decode("paged")
    for i, (c, p, g) in enumerate(zip(concat, prealloc, paged)):
        tokens = PROMPT + i
        assert c["reserved_bytes"] == kv_bytes(tokens)
        assert p["reserved_bytes"] == kv_bytes(40)
        blocks = BATCH * math.ceil(tokens / BLOCK)
        assert g["reserved_bytes"] == blocks * BLOCK * kv_bytes(1, batch=1)
    assert cache.blocks_allocated == BATCH * math.ceil((PROMPT + STEPS) / BLOCK)
    assert cache.pool.blocks_allocated == cache.blocks_allocated


def test_int8_bytes_exact_every_step():
    _, stats, _ = _decode("int8")
    for i, s in enumerate(stats):
        tokens = PROMPT + i
        assert s["token_state_bytes"] == s["reserved_bytes"] == kv_bytes(tokens, size=1)
        assert s["extra_bytes"] == L * 2 * BATCH * H * tokens * F32  # one fp32 scale per head and token


def test_concat_bytes_grow_linearly():
    _, stats, _ = _decode("concat")
    steps = {b["token_state_bytes"] - a["token_state_bytes"] for a, b in zip(stats, stats[1:])}
    assert steps == {kv_bytes(1)}


def test_sliding_never_exceeds_the_window():
    window = 8  # smaller than the prompt: the prefill already slides
    _, stats, _ = _decode("sliding", window=window)
    for i, s in enumerate(stats):
        assert s["tokens"] == min(PROMPT + i, window)
        assert s["token_state_bytes"] == kv_bytes(min(PROMPT + i, window)) <= kv_bytes(window)
        assert s["reserved_bytes"] == kv_bytes(window)


def test_sliding_ring_holds_the_last_window_positions():
    spec = KVSpec(layers=1, kv_heads=H, head_dim=HD)
    ring, full = SlidingCache(spec, 2, window=5), ConcatCache(spec, 2)
    torch.manual_seed(0)
    for n in (7, 1, 1, 3, 1):  # a prefill past the window, decodes, a chunk
        k, v = torch.randn(2, H, n, HD), torch.randn(2, H, n, HD)
        ring.update(0, k, v)
        full.update(0, k, v)
        ring.advance(n)
        full.advance(n)
        for p in range(full.seen - 5, full.seen):  # position p lives in slot p % window
            assert torch.equal(ring.k[0][:, :, p % 5], full.k[0][:, :, p])
            assert torch.equal(ring.v[0][:, :, p % 5], full.v[0][:, :, p])


# -- decode results ------------------------------------------------------------------------


def test_cached_decode_equals_recompute():
    reference, _, _ = _decode("none")
    assert reference.shape == (BATCH, STEPS + 1)
    for kind in ("concat", "prealloc", "paged"):
        tokens, _, _ = _decode(kind)
        assert torch.equal(tokens, reference), kind


def test_sliding_with_a_window_covering_everything_equals_concat():
    concat, _, _ = _decode("concat")
    sliding, _, _ = _decode("sliding", window=PROMPT + STEPS)
    assert torch.equal(sliding, concat)


def test_make_cache_rejects_unknown_kinds_and_missing_sizes():
    spec = KVSpec(layers=1, kv_heads=1, head_dim=4)
    with pytest.raises(ValueError, match="unknown KV cache kind"):
        make_cache("ring", spec, 1)
    with pytest.raises(ValueError, match="max_len"):
        make_cache("prealloc", spec, 1)
    assert set(KINDS) == {"concat", "prealloc", "sliding", "paged", "int8"}


def test_config_fails_at_start_up():
    with pytest.raises(ValueError, match="exceeds"):
        InferConfig(preset="tiny", prompt_len=60, steps=8)
    with pytest.raises(ValueError, match="model=llama"):
        InferConfig(preset="tiny", model="llama", kv="paged")
    with pytest.raises(ValueError, match="unknown infer toggles"):
        InferConfig.from_toggles("tiny", {"kv": "concat", "kvv": 1}, steps=2, device="cpu")


# -- the trace of infer.run ---------------------------------------------------------------------


def _kv_live_at_step_ends(events) -> dict[int, int]:
    """Bytes of live kv_cache allocations after each step's events, by plain replay."""
    live, at = {}, {}
    for action, addr, size, step, cat in zip(
        events["action"].astype(str),
        events["addr"],
        events["size_bytes"],
        events["step"],
        events["category"].astype(str),
    ):
        if action == "alloc" and cat == "kv_cache":
            live[addr] = size
        elif action == "free_requested":
            live.pop(addr, None)
        at[int(step)] = sum(live.values())
    return at


@pytest.mark.parametrize("kind", KINDS)
def test_infer_run_trace_has_a_kv_row_per_step(tmp_path, kind):
    steps = 3
    result = infer.run(
        "tiny",
        {"kv": kind, "batch": 2, "prompt_len": 6, "block_size": 4, "window": 5},
        out=str(tmp_path),
        name=kind,
        steps=steps,
        device="cpu",
    )
    assert result["status"] == "ok", result["error"]
    assert result["median_step_ms"] > 0 and result["loss"] is None
    assert result["tokens_per_s"] == pytest.approx(2 / (result["median_step_ms"] / 1e3))
    trace = load_trace(result["run_dir"])
    kv = trace.kv.sort_values("step")
    assert kv["step"].tolist() == list(range(steps + 1))  # the prefill, then each decode step
    assert set(trace.steps["step"]) >= set(kv["step"])
    # What the cache reports is what the allocator saw allocated under kv_cache.
    live = _kv_live_at_step_ends(trace.events)
    for row in kv.itertuples():
        assert live[row.step] == row.reserved_bytes + row.extra_bytes, (kind, row.step)


def test_infer_run_without_cache_and_with_int8_weights(tmp_path):
    result = infer.run("tiny", {"weights": "int8"}, out=str(tmp_path), name="q", steps=2, device="cpu")
    assert result["status"] == "ok", result["error"]
    assert load_trace(result["run_dir"]).kv.empty  # no cache, nothing to record


# -- int8 weights ------------------------------------------------------------------------------


def test_int8_linear_matches_its_dequantized_weight():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48)
    q = Int8Linear.from_linear(lin)
    x = torch.randn(5, 64)
    assert q.weight.dtype == torch.int8 and q.scale.shape == (48,)
    assert torch.allclose(q(x), torch.nn.functional.linear(x, q.dequantized_weight(), lin.bias), atol=1e-5)
    assert torch.allclose(q(x), lin(x), atol=0.02)  # int8 rounding error, one scale per row


def test_quantize_linears_skips_the_tied_head():
    cfg = InferConfig(preset="tiny", kv="concat")
    model = quantize_linears(build_model(cfg))
    kinds = {name: type(m).__name__ for name, m in model.named_modules()}
    assert kinds["blocks.0.attn.qkv"] == kinds["blocks.1.mlp.proj"] == "Int8Linear"
    assert kinds["lm_head"] == "Linear" and model.lm_head.weight is model.wte.weight


# -- the Llama-style model -----------------------------------------------------------------------


def test_llama_dynamic_cache_is_recorded(tmp_path):
    pytest.importorskip("transformers")
    from workloads.llama import llama_config

    steps = 3
    result = infer.run(
        "tiny",
        {"model": "llama", "kv": "concat", "batch": 2, "prompt_len": 6},
        out=str(tmp_path),
        name="llama",
        steps=steps,
        device="cpu",
    )
    assert result["status"] == "ok", result["error"]
    conf = llama_config(infer.gpt_preset("tiny"))
    assert conf.num_key_value_heads < conf.num_attention_heads  # grouped-query attention
    trace = load_trace(result["run_dir"])
    kv = trace.kv.sort_values("step")
    assert kv["cache"].str.contains("DynamicCache").all()
    assert kv["tokens"].tolist() == [6 + i for i in range(steps + 1)]
    hd = conf.hidden_size // conf.num_attention_heads
    expect = [conf.num_hidden_layers * 2 * 2 * conf.num_key_value_heads * hd * t * F32 for t in kv["tokens"]]
    assert kv["token_state_bytes"].tolist() == expect
    ev = trace.events
    assert ((ev["action"] == "alloc") & (ev["category"] == "kv_cache")).any()


def test_llama_cached_decode_equals_recompute():
    pytest.importorskip("transformers")
    out = {}
    for kind in ("none", "concat"):
        cfg = InferConfig(preset="tiny", model="llama", kv=kind, steps=6, batch=2, prompt_len=8)
        model = build_model(cfg)
        with torch.no_grad(), infer.sdpa_backends("cpu"):
            cache, forward = make_decoder(cfg, model)
            out[kind] = greedy_decode(forward, make_prompt(cfg), 6, recompute=cache is None)
    assert torch.equal(out["none"], out["concat"])


# -- CUDA ----------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", ("none",) + KINDS)
def test_infer_run_on_cuda(tmp_path, kind):
    result = infer.run(
        "tiny",
        {"kv": kind, "batch": 4, "prompt_len": 16, "window": 8},
        out=str(tmp_path),
        name=kind,
        steps=8,
        device="cuda",
    )
    assert result["status"] == "ok", result["error"]
    assert result["peak_reserved_bytes"] >= result["peak_allocated_bytes"] > 0
    kv = load_trace(result["run_dir"]).kv
    assert len(kv) == (0 if kind == "none" else 9)
