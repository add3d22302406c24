"""The analytic memory model: formulas against hand arithmetic, and against the bundled H100 runs."""

from __future__ import annotations

import glob
import os

import pytest

from profiler.estimate import (
    block_activation_bytes,
    config_from_meta,
    estimate,
    kv_cache_bytes,
    measured_vs_predicted,
    shape_from_hf,
    shape_from_preset,
)

SEEDS = os.path.join(os.path.dirname(__file__), "..", "..", "traces", "h100-ablation-seeds")


def test_gpt2_small_fp32_adamw_by_hand():
    s = shape_from_preset("gpt2-small")
    # params: wte 50304*768 = 38,633,472; wpe 1024*768 = 786,432; per block: ln 2*2*768 = 3,072,
    # qkv 768*2304+2304 = 1,771,776, proj 768*768+768 = 590,592, fc 768*3072+3072 = 2,362,368,
    # mlp.proj 3072*768+768 = 2,360,064 -> 7,087,872 x 12 = 85,054,464; ln_f 1,536; lm_head tied.
    P = 38_633_472 + 786_432 + 85_054_464 + 1_536
    assert s.num_params() == P == 124_475_904
    # b=8, s=1024, h=768: sbh = 6,291,456. fp32 block: 64*sbh (= 2 x (34 - 2 dropout masks))
    # + two layer norms' mean/rstd 2*2*8*1024*4 = 131,072 + SDPA logsumexp 8*12*1024*4 = 393,216.
    sbh = 1024 * 8 * 768
    block = 64 * sbh + 131_072 + 393_216
    assert block == 403_177_472
    assert block_activation_bytes(s, batch=8, seq=1024, precision="fp32") == block
    e = estimate(s, batch=8, seq=1024, precision="fp32", optimizer="adamw", detail=True)
    bsV = 8 * 1024 * 50304
    assert e["parameter"] == 4 * P
    assert e["optimizer_state"] == 8 * P  # exp_avg + exp_avg_sq, steps on the CPU
    assert e["gradient"] == 0  # zero_grad(set_to_none) before forward
    embed, ln_f = 4 * sbh, 4 * sbh + 2 * 8 * 1024 * 4
    assert e["activation"] == embed + 12 * block + ln_f + 4 * bsV  # + saved log-softmax
    assert e["temporary"] == 2 * 4 * bsV  # loss-backward gradients
    assert e["peak_phase"] == "loss_backward"
    assert e["peak"] == 4 * P + 8 * P + e["activation"] + e["temporary"] + e["workspace"]
    fused = estimate(s, batch=8, seq=1024, optimizer="adamw_fused")
    assert fused["optimizer_state"] == 8 * P + 4 * 148  # 148 fp32 step tensors on the device
    assert estimate(s, batch=8, seq=1024, optimizer="sgd_momentum")["optimizer_state"] == 4 * P
    assert estimate(s, batch=8, seq=1024, optimizer="sgd")["optimizer_state"] == 0


def test_tiny_bf16_checkpointed_by_hand():
    s = shape_from_preset("tiny")  # L=2, a=2, h=64, V=256, b=4, s=32
    # params: wte 256*64 = 16,384; wpe 64*64 = 4,096; block: matmul weights 64*192 + 64*64 +
    # 2*64*256 = 49,152, biases 192+64+256+64 = 576, layer norms 256 -> 49,984 x 2; ln_f 128.
    P = 16_384 + 4_096 + 2 * 49_984 + 128
    assert s.num_params() == P == 120_576
    sbh = 32 * 4 * 64  # 8,192
    # bf16 block: 36*sbh (32, with the two layer-norm inputs fp32: +4) + bf16 weight copies
    # 2*49,152 + layer-norm stats 2*2*4*32*4 = 2,048 + logsumexp 4*2*32*4 = 1,024.
    block = 36 * sbh + 2 * 49_152 + 2_048 + 1_024
    assert block == 396_288
    assert block_activation_bytes(s, batch=4, seq=32, precision="bf16") == block
    e = estimate(s, batch=4, seq=32, precision="bf16", optimizer="adamw", checkpointing="full", detail=True)
    assert e["per_block"] == [4 * sbh, 4 * sbh]  # only the fp32 block inputs are kept
    bsV = 4 * 32 * 256
    ln_f = 2 * sbh + 2 * 4 * 32 * 4 + 2 * 256 * 64  # bf16 cast + stats + bf16 tied weight
    act = 4 * sbh + 2 * 4 * sbh + ln_f + 4 * bsV  # embedding + 2 kept inputs + ln_f + log-softmax
    ws = e["workspace"]
    assert e["phases"]["loss_backward"] == 4 * P + 8 * P + act + 2 * 4 * bsV + ws
    # tiny's vocabulary is small, so recomputing one block with all gradients held is the peak:
    assert e["phases"]["recompute"] == 4 * P + 4 * P + 8 * P + 4 * sbh + 2 * 4 * sbh + block + ws
    assert e["peak_phase"] == "recompute" and e["peak"] == e["phases"]["recompute"]
    # with accumulation 2 the gradients (4 B/param) are held during the later micro-batches
    acc = estimate(s, batch=4, seq=32, precision="bf16", accumulation=2, detail=True)
    assert acc["gradient"] == 4 * P
    assert acc["per_block"][0] == block_activation_bytes(s, batch=2, seq=32, precision="bf16")
    # every:2 checkpoints blocks 0, 2, ...
    ev = estimate(s, batch=4, seq=32, precision="bf16", checkpointing="every:2", detail=True)
    assert ev["per_block"] == [4 * sbh, block]


def test_kv_cache_and_hf_config():
    s = shape_from_hf(
        {
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "hidden_size": 4096,
            "vocab_size": 128256,
            "intermediate_size": 14336,
        }
    )
    # 32 layers x 2 x 8192 tokens x 8 kv heads x 128 head_dim x 2 B x batch 1 = 1 GiB
    assert kv_cache_bytes(s, tokens=8192, batch=1) == 32 * 2 * 8192 * 8 * 128 * 2 == 1 << 30


def _runs():
    return sorted(glob.glob(os.path.join(SEEDS, "ablate-seeds-*")))


@pytest.mark.skipif(not glob.glob(os.path.join(SEEDS, "ablate-seeds-*")), reason="bundled runs missing")
def test_bundled_h100_runs_within_10_percent(capsys):
    from profiler.trace.reader import load_trace

    rows, misses = [], []
    for run in _runs():
        trace = load_trace(run)
        name = trace.meta["name"].removeprefix("ablate-seeds-")
        try:
            kw = config_from_meta(trace.meta)
        except ValueError as exc:
            rows.append(f"{name:<22} not modelled: {exc}")
            continue
        table = measured_vs_predicted(trace, estimate(**kw, detail=True))
        peak = table[table["name"] == "peak"].iloc[0]
        rows.append(
            f"{name:<22} measured {peak.measured_bytes / 2**30:7.3f} GiB  predicted "
            f"{peak.predicted_bytes / 2**30:7.3f} GiB  {peak.error_pct:+6.2f}%"
        )
        if abs(peak.error_pct) > 10:
            misses.append(name)
        layers = table[table["level"] == "layer"]
        bad = layers[(layers["error_pct"].abs() > 15) & ~layers["explanation"].str.startswith("workspace")]
        assert bad.empty, (name, bad)
    with capsys.disabled():
        print("\n" + "\n".join(rows))
    assert not misses, misses
    assert sum("not modelled" not in r for r in rows) >= 16


def test_a_model_object_on_the_meta_device_estimates_like_its_config():
    import torch

    from profiler.estimate import estimate
    from workloads.model import GPT, preset

    cfg = preset("gpt2-small")
    with torch.device("meta"):
        model = GPT(cfg)
    by_model = estimate(model, batch=8, seq=1024, precision="bf16", optimizer="adamw")
    by_name = estimate("gpt2-small", batch=8, seq=1024, precision="bf16", optimizer="adamw")
    assert by_model == by_name
    assert by_model["parameter"] == 4 * model.num_params()


def test_the_cublas_workspace_is_counted_on_cuda_runs_only():
    from profiler.estimate import DEFAULT_WORKSPACE

    meta = {"config": {"preset": "tiny"}}
    on_cpu = config_from_meta({**meta, "backend": "cpu"})
    on_cuda = config_from_meta({**meta, "backend": "cuda"})
    assert on_cpu["workspace_bytes"] == 0
    assert on_cuda["workspace_bytes"] == DEFAULT_WORKSPACE == 65 << 20
    cpu, cuda = estimate(**on_cpu, detail=True), estimate(**on_cuda, detail=True)
    assert cpu["workspace"] == 0 and cpu["peak_phase"] == cuda["peak_phase"] == "loss_backward"
    assert cuda["peak"] - cpu["peak"] == DEFAULT_WORKSPACE  # the loss backward holds the whole workspace
