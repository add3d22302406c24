"""CPU tests for the reference GPT workload."""

from __future__ import annotations

import math

import pytest
import torch

from workloads.model import GPT, PRESETS, preset
from workloads.train import build, main, make_batch, train_step


def _expected_params(V: int, T: int, d: int, L: int) -> int:
    per_layer = (
        2 * (2 * d)  # ln_1, ln_2: weight + bias
        + (3 * d * d + 3 * d)  # attn.qkv
        + (d * d + d)  # attn.proj
        + (4 * d * d + 4 * d)  # mlp.fc
        + (4 * d * d + d)  # mlp.proj
    )
    # wte + wpe + blocks + ln_f; the tied lm_head adds nothing.
    return V * d + T * d + L * per_layer + 2 * d


def test_tiny_forward_shapes():
    torch.manual_seed(0)
    cfg = preset("tiny")
    model = GPT(cfg)
    idx, targets = make_batch(cfg)
    assert idx.shape == targets.shape == (cfg.batch_size, cfg.seq_len)
    assert idx.dtype == torch.int64

    logits, loss = model(idx)
    assert logits.shape == (cfg.batch_size, cfg.seq_len, cfg.vocab_size)
    assert loss is None

    logits, loss = model(idx, targets)
    assert loss.dim() == 0 and loss.dtype == torch.float32
    assert torch.isfinite(loss)
    # Fresh init predicts close to uniform over the vocabulary.
    assert abs(loss.item() - math.log(cfg.vocab_size)) < 0.5


def test_loss_decreases_on_fixed_batch():
    torch.manual_seed(0)
    cfg = preset("tiny")
    model, opt = build(cfg)
    batch = make_batch(cfg)
    losses = [train_step(model, opt, batch).item() for _ in range(20)]
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0] - 0.5, losses  # ~1.0 drop in practice


def test_train_step_bf16_autocast_and_sgd():
    torch.manual_seed(0)
    cfg = preset("tiny")
    model, opt = build(cfg, optimizer="sgd")
    loss = train_step(model, opt, make_batch(cfg), autocast_dtype=torch.bfloat16)
    assert not loss.requires_grad
    assert torch.isfinite(loss)
    assert all(p.grad is None for p in model.parameters())


def test_init_is_deterministic_under_manual_seed():
    cfg = preset("tiny")
    torch.manual_seed(123)
    a = GPT(cfg)
    torch.manual_seed(123)
    b = GPT(cfg)
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa, pb), name


def test_gpt2_small_param_count_on_meta():
    cfg = preset("gpt2-small")
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd) == (12, 12, 768)
    assert (cfg.vocab_size, cfg.block_size, cfg.batch_size, cfg.seq_len) == (50304, 1024, 8, 1024)
    with torch.device("meta"):
        model = GPT(cfg)
    expected = _expected_params(V=50304, T=1024, d=768, L=12)
    assert expected == 124_475_904  # nanoGPT's "124.47M" for vocab 50304
    assert model.num_params() == expected


def test_weights_tied():
    model = GPT(preset("tiny"))
    assert model.lm_head.weight is model.wte.weight
    assert model.lm_head.bias is None


def test_module_paths():
    names = {name for name, _ in GPT(preset("tiny")).named_modules()}
    for path in [
        "wte", "wpe", "ln_f", "lm_head",
        "blocks.0.ln_1", "blocks.0.attn.qkv", "blocks.0.attn.proj",
        "blocks.1.ln_2", "blocks.1.mlp.fc", "blocks.1.mlp.act", "blocks.1.mlp.proj",
    ]:  # fmt: skip
        assert path in names, path


def test_preset_errors_and_copies():
    with pytest.raises(ValueError, match="known presets"):
        preset("gpt5")
    cfg = preset("tiny")
    cfg.batch_size = 99
    assert PRESETS["tiny"].batch_size != 99


def test_fused_requires_cuda():
    with pytest.raises(ValueError, match="cuda"):
        build(preset("tiny"), device="cpu", fused=True)


def test_main_prints_steps(capsys):
    main(["--preset", "tiny", "--steps", "2", "--device", "cpu"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[:2] for line in lines] == [["step", "0"], ["step", "1"]]
    assert all(line.split()[2] == "loss" for line in lines)
