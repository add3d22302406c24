"""Sampled module hooks never cost the peak: a nanoGPT-style loop on CPU whose one long batch
(step 7, outside the hooked steps) sets the peak, with gradient accumulation 2, captured with the
default hooked_steps and with every step hooked; and the same with a DataLoader's worker processes.

The sampled capture must attribute the peak as the fully hooked one does: the same module for
each allocation of the long step, the same bytes per module at the peak, forward rows in the
phases table for every step, and exact parameter and AdamW state bytes.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

import profiler
from profiler.analysis.live import alive_at_peak
from profiler.report import build_report, render
from profiler.trace.reader import load_trace
from workloads.model import GPT, preset

STEPS = 10
ACCUMULATE = 2
LONG_STEP = 7  # hooked steps (3, 50): 0, 1, 2; 8 is hooked for following a new peak
SHORT, LONG = 16, 64
BATCH = 4
ROLE_CATEGORIES = {"parameter", "gradient", "optimizer_state"}


def _seq_len(step: int) -> int:
    return LONG if step == LONG_STEP else SHORT


class _Tokens(Dataset):
    """Random token windows; the micro-batches of LONG_STEP are longer. Each item is seeded by its index."""

    def __init__(self, vocab: int) -> None:
        self.vocab = vocab

    def __len__(self) -> int:
        return STEPS * ACCUMULATE * BATCH

    def __getitem__(self, i: int):
        g = torch.Generator().manual_seed(i)
        x = torch.randint(self.vocab, (_seq_len(i // (ACCUMULATE * BATCH)) + 1,), generator=g)
        return x[:-1], x[1:]


def _batches(cfg, workers: int | None):
    if workers is None:
        g = torch.Generator().manual_seed(1)
        for i in range(STEPS * ACCUMULATE):
            x = torch.randint(cfg.vocab_size, (BATCH, _seq_len(i // ACCUMULATE) + 1), generator=g)
            yield x[:, :-1].contiguous(), x[:, 1:].contiguous()
    else:
        yield from DataLoader(_Tokens(cfg.vocab_size), batch_size=BATCH, num_workers=workers)


def _train(out, hooked_steps, workers=None, drain_interval_s=0.5):
    torch.manual_seed(0)
    cfg = preset("tiny")
    model = GPT(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batches = _batches(cfg, workers)
    opts = dict(hooked_steps=hooked_steps, drain_interval_s=drain_interval_s)
    with profiler.profile(out=out, name="sampled", backend="cpu", **opts) as prof:
        for _ in range(STEPS):
            for _ in range(ACCUMULATE):
                idx, targets = next(batches)
                _, loss = model(idx, targets)
                (loss / ACCUMULATE).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    return load_trace(prof.run_dir), model, opt


@pytest.fixture(scope="module", params=[None, 2], ids=["loop", "dataloader-workers"])
def runs(request, tmp_path_factory):
    """(workers, sampled, full): each a (trace, model, optimizer, report) of one capture."""
    out = tmp_path_factory.mktemp("sampling")
    sampled = _train(out, (3, 50), workers=request.param)
    full = _train(out, None, workers=request.param)
    return request.param, (*sampled, build_report(sampled[0])), (*full, build_report(full[0]))


def _allocs(trace, step=None):
    ev = trace.events
    keep = ev["action"] == "alloc"
    if step is not None:
        keep &= ev["step"] == step
    return ev[keep]


def test_the_long_step_ran_unhooked_and_set_the_peak(runs):
    workers, (sampled, _, _, report), _ = runs
    hooked = sampled.steps["modules_hooked"].tolist()
    assert report["peak"]["step"] == LONG_STEP
    assert "warnings" not in report
    if workers is None:  # with worker processes, batches arrive when they will, and hooking adapts
        assert hooked[:STEPS] == [True] * 3 + [False] * 5 + [True, False]


def test_the_peak_is_attributed(runs):
    _, (sampled, *_), _ = runs
    live = alive_at_peak(sampled)
    attributed = live["module"].notna() | (live["phase"] == "optimizer") | live["category"].isin(ROLE_CATEGORIES)
    share = live["size_bytes"][attributed].sum() / live["size_bytes"].sum()
    assert share >= 0.99, live[~attributed].groupby(["phase", "category"], dropna=False)["size_bytes"].sum()


def test_the_long_step_has_the_modules_of_a_fully_hooked_run(runs):
    workers, (sampled, *_, report), (full, *_, full_report) = runs
    if workers is None:  # the same events in the same order: compare allocation by allocation
        mine, truth = _allocs(sampled, LONG_STEP), _allocs(full, LONG_STEP)
        assert mine["size_bytes"].tolist() == truth["size_bytes"].tolist()
        assert mine["module"].astype(object).tolist() == truth["module"].astype(object).tolist()
        assert mine["phase"].astype(object).tolist() == truth["phase"].astype(object).tolist()
        forward = mine[mine["phase"] == "forward"]
        assert {"blocks.0.attn.qkv", "blocks.1.mlp.fc", "lm_head"} <= set(forward["module"].astype(str))
    by_module = [
        alive_at_peak(t).groupby("module", dropna=False)["size_bytes"].sum().to_dict() for t in (sampled, full)
    ]
    assert by_module[0] == by_module[1]
    assert report["categories"] == full_report["categories"]


def test_every_step_has_forward_rows_and_one_optimizer_step(runs):
    _, (sampled, *_), _ = runs
    ph = sampled.phases
    for step in range(STEPS):
        mine = ph[ph["step"] == step]["phase"].astype(str).tolist()
        # Each micro-batch's forward and backward, then the optimizer: never one long backward.
        assert mine == ["forward", "backward"] * ACCUMULATE + ["optimizer"], (step, mine)
    optimizer_steps = sorted(set(ph[ph["phase"] == "optimizer"]["step"].tolist()))
    assert optimizer_steps == list(range(STEPS))
    # The steps table ends each optimizer step, and holds the frees after the last one (zero_grad).
    assert sampled.steps["step"].tolist() == list(range(STEPS + 1))


def test_parameter_and_adamw_state_bytes_are_exact(runs):
    _, (_, model, opt, report), _ = runs
    categories = {c["category"]: c["total_bytes"] for c in report["categories"]}
    param_bytes = sum(p.numel() for p in model.parameters()) * 4
    step_bytes = sum(s["step"].nbytes for s in opt.state.values() if torch.is_tensor(s["step"]))
    assert categories["parameter"] == param_bytes
    assert categories["optimizer_state"] == 2 * param_bytes + step_bytes
    assert categories["gradient"] == param_bytes  # at the peak, in the second backward: all grads exist


def test_allocations_no_hooked_step_matches_are_reported(tmp_path):
    """Step 1 runs other code unhooked (hooked_steps (1, 0)): nothing can label it, and its
    activations are alive at the peak. The capture hooks step 2 for having been new."""
    torch.manual_seed(0)
    cfg = preset("tiny")
    small = torch.nn.Sequential(torch.nn.Linear(8, 8))
    model = GPT(cfg)
    opt = torch.optim.SGD(list(small.parameters()) + list(model.parameters()), lr=0.1)
    with profiler.profile(out=tmp_path, name="unmatched", backend="cpu", hooked_steps=(1, 0)) as prof:
        for step in range(3):
            if step == 1:
                idx = torch.randint(cfg.vocab_size, (8, 64))
                model(idx, idx)[1].backward()
            else:
                small(torch.randn(4, 8)).sum().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    trace = load_trace(prof.run_dir)
    assert trace.steps["modules_hooked"].tolist()[:3] == [True, False, True]
    # Step 1, and the tail's frees of step 2's gradients (sizes no hooked free had, and no stack).
    assert trace.meta["steps_without_template"] == 2 and trace.meta["template_steps"] == []
    report = build_report(trace)
    assert report["peak"]["step"] == 1
    (warning,) = report["warnings"]
    assert warning["reason"] == "unhooked" and warning["steps"] == [1]
    assert warning["message"].endswith(
        "have no module: step 1 ran unhooked and no hooked step matched these allocations; "
        "rerun with --hooked-steps all (hooked_steps=None)"
    )
    assert f"warning: {warning['message']}" in render(report)


def test_filled_steps_get_phase_spans_when_the_live_meta_lags(tmp_path):
    """A drain interval longer than the run: the live meta.json's steps_completed stays at its
    first value, and the spans of every filled step still come from the final count."""
    sampled, *_ = _train(tmp_path, (3, 50), drain_interval_s=3600.0)
    filled = sampled.meta["template_steps"]
    assert filled and max(filled) == STEPS - 1
    ph = sampled.phases
    for step in filled:
        mine = ph[ph["step"] == step]["phase"].astype(str).tolist()
        assert mine == ["forward", "backward"] * ACCUMULATE + ["optimizer"], (step, mine)
