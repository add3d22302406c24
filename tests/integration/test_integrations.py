"""Framework callbacks (profiler.integrations): transformers.Trainer and Lightning, on CPU."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from profiler.integrations import StepCapture
from profiler.trace.reader import load_trace


def _mapping(trace) -> dict[int, int]:
    return {int(k): v for k, v in trace.meta["framework_steps"].items()}


def test_importing_integrations_imports_no_framework():
    code = (
        "import sys, profiler.integrations as m; "
        "bad = [x for x in ('transformers', 'lightning', 'pytorch_lightning') if x in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_step_selection():
    cap = StepCapture(steps=range(2, 5))
    assert [s for s in range(8) if cap.wants(s)] == [2, 3, 4]
    assert not cap.done(3) and cap.done(4)
    cap = StepCapture(steps=[7, 1, 3])
    assert [s for s in range(8) if cap.wants(s)] == [1, 3, 7] and cap.done(7)
    assert StepCapture(steps=None).wants(10**9)
    with pytest.raises(TypeError):
        StepCapture(steps=1.5)
    with pytest.raises(TypeError):
        StepCapture(extra_meta={})
    with pytest.raises(TypeError, match="stackz"):
        StepCapture(stackz=False)


def test_hand_driven_capture_blocks_and_exception(tmp_path):
    """Non-consecutive steps give one trace per block; an exception closes with an error."""
    model = torch.nn.Linear(8, 8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cap = StepCapture(out=tmp_path, name="loop", steps=[1, 2, 4], backend="cpu")
    with pytest.raises(ValueError), cap:
        for step in range(6):
            cap.begin_step(step, model=model)
            model(torch.randn(4, 8)).sum().backward()
            opt.step()
            opt.zero_grad()
            if step == 4:
                assert cap.active
                raise ValueError("boom")
            cap.end_step(step)
    assert not cap.active and len(cap.run_dirs) == 2
    first, second = (load_trace(d) for d in cap.run_dirs)
    assert first.status == "complete" and _mapping(first) == {0: 1, 1: 2}
    assert second.status == "error" and "boom" in second.meta["error"]


# -- transformers --------------------------------------------------------------------------


def test_hf_trainer_three_steps(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")  # Trainer needs it
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

    from profiler.integrations.hf import VramscopeCallback

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
    )
    model = LlamaForCausalLM(cfg)
    ids = torch.randint(0, 64, (12, 8))
    data = [{"input_ids": x, "labels": x.clone()} for x in ids]
    args = TrainingArguments(
        output_dir=str(tmp_path / "hf"),
        max_steps=3,
        per_device_train_batch_size=4,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    cb = VramscopeCallback(
        out=tmp_path / "traces", name="hf", steps=None, backend="cpu", config={"lr": args.learning_rate}
    )
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[cb])
    with cb:
        trainer.train()
    assert trainer.state.global_step == 3 and not cb.capture.active

    trace = load_trace(cb.run_dir)
    assert trace.status == "complete"
    assert trace.meta["steps_completed"] == 3
    assert _mapping(trace) == {0: 1, 1: 2, 2: 3}
    assert trace.meta["framework"]["name"] == "transformers"
    assert trace.meta["framework"]["version"] == transformers.__version__
    assert trace.meta["config"] == {"lr": args.learning_rate}
    assert {0, 1, 2} <= set(trace.steps["step"])
    names = set(trace.modules["module"].astype(str))
    assert "model.layers.0.self_attn.q_proj" in names, sorted(names)[:20]
    used = set(trace.events["module"].dropna().astype(str))
    assert any(m.startswith("model.layers.0.") for m in used)
    assert "optimizer" in set(trace.phases["phase"])


def test_hf_chosen_steps_and_exception(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")  # Trainer needs it
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

    from profiler.integrations.hf import VramscopeCallback

    cfg = GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    ids = torch.randint(0, 64, (16, 8))
    data = [{"input_ids": x, "labels": x.clone()} for x in ids]

    def trainer_for(out, *callbacks, steps=4):
        args = TrainingArguments(
            output_dir=str(out),
            max_steps=steps,
            per_device_train_batch_size=2,
            gradient_accumulation_steps=2,
            report_to="none",
            use_cpu=True,
            save_strategy="no",
            logging_strategy="no",
            disable_tqdm=True,
        )
        return Trainer(model=GPT2LMHeadModel(cfg), args=args, train_dataset=data, callbacks=list(callbacks))

    # Steps 2..3 of 4, with gradient accumulation: the capture closes after step 3.
    cb = VramscopeCallback(out=tmp_path / "traces", name="chosen", steps=range(2, 4), backend="cpu")
    trainer_for(tmp_path / "a", cb).train()
    trace = load_trace(cb.run_dir)
    assert len(cb.run_dirs) == 1 and trace.status == "complete"
    assert _mapping(trace) == {0: 2, 1: 3} and trace.meta["steps_completed"] == 2
    assert trace.meta["framework"]["requested_steps"] == {"start": 2, "stop": 4, "step": 1}
    assert "transformer.h.0.attn.c_attn" in set(trace.modules["module"].astype(str))

    class Boom(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 2:
                raise RuntimeError("boom at 2")

    cb = VramscopeCallback(out=tmp_path / "traces", name="boom", backend="cpu")
    with pytest.raises(RuntimeError, match="boom"), cb:
        trainer_for(tmp_path / "b", cb, Boom()).train()
    trace = load_trace(cb.run_dir)
    assert trace.status == "error" and "boom at 2" in trace.meta["error"]
    assert _mapping(trace) == {0: 1, 1: 2}
    from profiler.capture import session

    assert session.active() is None


# -- Lightning -----------------------------------------------------------------------------


def _lightning_module(L):
    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.fc1 = torch.nn.Linear(8, 16)
            self.fc2 = torch.nn.Linear(16, 1)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.mse_loss(self.fc2(torch.relu(self.fc1(x))), y)

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-2)

    return Tiny()


def _loader(n=24):
    ds = torch.utils.data.TensorDataset(torch.randn(n, 8), torch.randn(n, 1))
    return torch.utils.data.DataLoader(ds, batch_size=4)


def _pl_trainer(L, max_steps, callbacks, **kw):
    return L.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        **kw,
    )


def test_lightning_three_steps(tmp_path):
    L = pytest.importorskip("lightning")
    from profiler.integrations.lightning import VramscopeCallback

    cb = VramscopeCallback(out=tmp_path / "traces", name="pl", backend="cpu")
    trainer = _pl_trainer(L, 3, [cb])
    trainer.fit(_lightning_module(L), train_dataloaders=_loader())
    assert trainer.global_step == 3 and not cb.capture.active

    trace = load_trace(cb.run_dir)
    assert trace.status == "complete" and trace.meta["steps_completed"] == 3
    assert _mapping(trace) == {0: 0, 1: 1, 2: 2}
    assert trace.meta["framework"]["name"] == "lightning"
    assert {0, 1, 2} <= set(trace.steps["step"])
    names = set(trace.modules["module"].astype(str))
    assert {"fc1", "fc2"} <= names, sorted(names)
    assert {"fc1", "fc2"} <= set(trace.events["module"].dropna().astype(str))
    # The update is in the optimizer phase even though Lightning runs the closure in step().
    assert "optimizer" in set(trace.phases["phase"])
    states = trace.events[trace.events["category"] == "optimizer_state"]
    assert len(states) > 0 and (states["phase"] == "optimizer").all()


def test_lightning_chosen_steps_accumulation_and_exception(tmp_path):
    L = pytest.importorskip("lightning")
    from profiler.integrations.lightning import VramscopeCallback

    cb = VramscopeCallback(out=tmp_path / "traces", name="acc", steps=[1, 2], backend="cpu")
    trainer = _pl_trainer(L, 4, [cb], accumulate_grad_batches=2)
    trainer.fit(_lightning_module(L), train_dataloaders=_loader(48))
    trace = load_trace(cb.run_dir)
    assert len(cb.run_dirs) == 1 and trace.status == "complete"
    assert _mapping(trace) == {0: 1, 1: 2}

    class Boom(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 2:
                raise RuntimeError("boom at 2")

    cb = VramscopeCallback(out=tmp_path / "traces", name="boom", backend="cpu")
    with pytest.raises(RuntimeError, match="boom"):
        _pl_trainer(L, 5, [cb, Boom()]).fit(_lightning_module(L), train_dataloaders=_loader())
    trace = load_trace(cb.run_dir)
    assert trace.status == "error" and "boom at 2" in trace.meta["error"]
    assert _mapping(trace) == {0: 0, 1: 1}
    from profiler.capture import session

    assert session.active() is None
