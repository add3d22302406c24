"""Training toggles (workloads/toggles): each is in effect, keeps the loss, and bad combinations fail at start.

CPU tests run the tiny preset, captured through `workloads.train.run` where the
trace is the evidence, or through a bare `Trainer` where it is not (faster).
`@pytest.mark.gpu` tests need CUDA: run them with `pytest -m gpu` on the device.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.autograd.graph import save_on_cpu
from torch.utils._python_dispatch import TorchDispatchMode

from profiler.analysis import category_at_peak, category_peaks
from profiler.trace.reader import load_trace
from workloads.model import preset
from workloads.toggles import AllocatorConfig, CompileConfig, TrainToggles, apply_toggles, from_dict, offload, precision
from workloads.train import Trainer, main, run

REPO = Path(__file__).resolve().parents[2]
CFG = preset("tiny")
STEPS = 3  # captured runs: step 0 creates optimizer state, later steps are steady
EQUIV_STEPS = 5
FP32_RTOL = 1e-5  # measured: 0 for checkpointing and offload, ~1e-7 for accumulation and attention
HALF_RTOL = 2e-2  # measured: ~2e-5 for bf16 and fp16 on the CPU
CUDA = torch.cuda.is_available()
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
_aten = torch.ops.aten


def toggles(d: dict | None = None, device: str = "cpu") -> TrainToggles:
    return from_dict(d or {}, device=device, batch_size=CFG.batch_size)


def trainer_losses(
    d: dict | None = None, device: str = "cpu", steps: int = EQUIV_STEPS, compile_backend=None
) -> list[float]:
    t = toggles(d, device)
    if compile_backend is not None:
        t.compile = CompileConfig(backend=compile_backend)
    trainer = Trainer(CFG, t)
    return [trainer.step().item() for _ in range(steps)]


@pytest.fixture(scope="module")
def captured(tmp_path_factory):
    """run() results and their traces, one capture per toggle dict, shared by the tests."""
    out = tmp_path_factory.mktemp("toggle-runs")
    cache: dict[str, tuple[dict, object]] = {}

    def get(d: dict | None = None):
        key = json.dumps(d or {}, sort_keys=True)
        if key not in cache:
            res = run("tiny", dict(d or {}), out=str(out), name=key, steps=STEPS, device="cpu")
            assert res["status"] == "ok", res
            cache[key] = (res, load_trace(res["run_dir"]))
        return cache[key]

    return get


def peak_of(trace, category: str) -> int:
    """The category's own peak over the run."""
    t = category_peaks(trace)
    return int(t.loc[t["category"] == category, "peak_bytes"].iloc[0])


def at_peak(trace, category: str) -> int:
    """The category's bytes at the moment of the allocated peak."""
    t = category_at_peak(trace)
    return int(t.loc[t["category"] == category, "total_bytes"].iloc[0])


class OpLog(TorchDispatchMode):
    """(op, output dtype) of every op run inside it."""

    def __init__(self):
        super().__init__()
        self.ops: list[tuple[object, torch.dtype | None]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.append((func, out.dtype if isinstance(out, torch.Tensor) else None))
        return out


# -- the run() contract -------------------------------------------------------------


def test_run_result_follows_the_interface(captured):
    res, trace = captured()
    assert set(res) >= {
        "status",
        "run_dir",
        "peak_allocated_bytes",
        "peak_reserved_bytes",
        "median_step_ms",
        "tokens_per_s",
        "loss",
        "losses",
        "error",
    }
    assert res["error"] is None and trace.status == "complete"
    assert res["peak_allocated_bytes"] == trace.meta["max_allocated_bytes"] > 0
    assert res["peak_reserved_bytes"] is None  # no caching allocator on the CPU
    assert len(res["losses"]) == STEPS and res["loss"] == res["losses"][-1]
    tokens = CFG.batch_size * CFG.seq_len
    assert res["tokens_per_s"] == pytest.approx(tokens / (res["median_step_ms"] / 1e3))
    assert trace.meta["config"] == {"preset": "tiny", "batch_size": 4, "seq_len": 32}
    # The step boundary is the optimizer step: one trace step per optimizer step.
    assert trace.steps["step"].tolist()[:STEPS] == list(range(STEPS))
    # Capture changes nothing numerically: the same losses as a bare Trainer.
    assert res["losses"] == trainer_losses(steps=STEPS)


def test_run_reports_bad_toggles_as_error_without_a_trace(tmp_path):
    res = run("tiny", {"accumulation": 3}, out=str(tmp_path), name="bad", steps=1, device="cpu")
    assert res["status"] == "error" and res["run_dir"] is None
    assert "does not divide the batch of 4" in res["error"] and "\n" not in res["error"]


def test_run_refuses_compile_under_the_cpu_capture(tmp_path):
    res = run("tiny", {"compile": "on"}, out=str(tmp_path), name="c", steps=1, device="cpu")
    assert res["status"] == "error" and "dynamo skips compilation" in res["error"]


def test_oom_is_status_oom_and_the_trace_finalizes(tmp_path, monkeypatch):
    real_step = Trainer.step
    calls = []

    def step(self):
        calls.append(1)
        if len(calls) == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_step(self)

    monkeypatch.setattr(Trainer, "step", step)
    res = run("tiny", {}, out=str(tmp_path), name="oom", steps=3, device="cpu")
    assert res["status"] == "oom" and res["error"].startswith("OutOfMemoryError: CUDA out of memory")
    assert len(res["losses"]) == 1 and res["peak_allocated_bytes"] > 0
    assert load_trace(res["run_dir"]).status == "oom"


def test_cli_prints_the_result_json(tmp_path, capsys):
    main(
        [
            "--preset",
            "tiny",
            "--steps",
            "2",
            "--device",
            "cpu",
            "--out",
            str(tmp_path),
            "--precision",
            "bf16",
            "--checkpointing",
            "every:2",
        ]
    )
    res = json.loads(capsys.readouterr().out)
    assert res["status"] == "ok" and len(res["losses"]) == 2
    config = load_trace(res["run_dir"]).meta["config"]
    assert config == {"preset": "tiny", "batch_size": 4, "seq_len": 32, "precision": "bf16", "checkpointing": "every:2"}


# -- each toggle is in effect -------------------------------------------------------


@pytest.mark.parametrize("mode", ["full", "every:2", "selective"])
def test_checkpointing_recomputes_and_lowers_activations(captured, mode):
    _, base = captured()
    _, trace = captured({"checkpointing": mode})
    ev = trace.events
    recompute = set(ev.loc[ev["phase"] == "recompute", "module"].dropna().astype(str))
    assert recompute, "no allocation was made in the recompute phase"
    blocks = {m.split(".")[1] for m in recompute if m.startswith("blocks.")}
    assert blocks == ({"0"} if mode == "every:2" else {"0", "1"})  # tiny has 2 blocks
    assert not (base.events["phase"] == "recompute").any()
    assert peak_of(trace, "activation") < peak_of(base, "activation")
    assert at_peak(trace, "activation") < at_peak(base, "activation")


def test_checkpointing_levels_order_activation_bytes(captured):
    act = {m: peak_of(captured({"checkpointing": m})[1], "activation") for m in ("full", "selective")}
    # Selective keeps the matmul outputs that full recomputes.
    assert act["full"] < act["selective"] < peak_of(captured()[1], "activation")


def test_bf16_autocasts_matmuls():
    for d, dtype in (({"precision": "bf16"}, torch.bfloat16), ({}, torch.float32)):
        trainer = Trainer(CFG, toggles(d))
        with OpLog() as log:
            trainer.step()
        matmuls = [dt for op, dt in log.ops if op in (_aten.mm.default, _aten.addmm.default)]
        assert matmuls and set(matmuls) == {dtype}, (d, set(matmuls))
        # Master weights, and so their gradients and optimizer states, stay fp32.
        assert {p.dtype for p in trainer.model.parameters()} == {torch.float32}


def _param_bytes() -> int:
    return sum(p.numel() * p.element_size() for p in Trainer(CFG, toggles()).model.parameters())


def test_optimizer_state_bytes(captured):
    params = _param_bytes()
    n_tensors = len(list(Trainer(CFG, toggles()).model.parameters()))
    _, adamw = captured()
    assert peak_of(adamw, "parameter") == params
    # exp_avg and exp_avg_sq, plus one fp32 step counter per parameter tensor (on the CPU).
    assert peak_of(adamw, "optimizer_state") == 2 * params + 4 * n_tensors
    assert peak_of(captured({"optimizer": "sgd"})[1], "optimizer_state") == 0
    assert peak_of(captured({"optimizer": "sgd_momentum"})[1], "optimizer_state") == params


@pytest.mark.parametrize("k", [2, 4])
def test_accumulation_runs_k_passes_per_step(captured, k):
    res, trace = captured({"accumulation": k})
    phases = trace.phases
    for step in (0, 1):  # hooked steps
        names = phases.loc[phases["step"] == step, "phase"].astype(str).tolist()
        assert names == ["forward", "backward"] * k + ["optimizer"], (step, names)
    assert trace.steps["step"].tolist()[:STEPS] == list(range(STEPS))
    assert len(res["losses"]) == STEPS
    # Activations scale with the micro-batch.
    assert peak_of(trace, "activation") < peak_of(captured()[1], "activation")


def test_fp16_runs_the_grad_scaler():
    if not precision.scaler_available(torch.device("cpu")):
        with pytest.raises(ValueError, match=r"fp16 needs torch.amp.GradScaler\('cpu'\)"):
            toggles({"precision": "fp16"})
        pytest.skip(f"torch {torch.__version__} has no CPU GradScaler; its refusal is checked")
    trainer = Trainer(CFG, toggles({"precision": "fp16", "accumulation": 2}))
    scaler = trainer.plan.scaler
    scaled = []
    real_scale = scaler.scale
    scaler.scale = lambda loss: scaled.append(loss) or real_scale(loss)
    losses = [trainer.step().item() for _ in range(2)]
    assert len(scaled) == 4  # once per micro-batch
    assert all(s.dtype == torch.float32 for s in scaled)
    assert scaler.get_scale() > 1 and all(math.isfinite(x) for x in losses)


def test_fp16_refused_where_no_grad_scaler(monkeypatch):
    monkeypatch.setattr(precision, "scaler_available", lambda device: False)
    with pytest.raises(ValueError, match="fp16 needs torch.amp.GradScaler.*use bf16"):
        toggles({"precision": "fp16"})


def test_offload_packs_saved_tensors(monkeypatch):
    calls = {"pack": 0, "unpack": 0, "pin": set()}

    class Spy(save_on_cpu):
        def __init__(self, pin_memory=False, device_type="cuda"):
            super().__init__(pin_memory=pin_memory, device_type=device_type)
            calls["pin"].add(pin_memory)
            pack, unpack = self.pack_hook, self.unpack_hook

            def counted_pack(t):
                calls["pack"] += 1
                return pack(t)

            def counted_unpack(p):
                calls["unpack"] += 1
                return unpack(p)

            self.pack_hook, self.unpack_hook = counted_pack, counted_unpack

    monkeypatch.setattr(offload, "save_on_cpu", Spy)
    Trainer(CFG, toggles({"offload": "on"})).step()
    # On the CPU the host copy is the tensor itself: device memory checks are @gpu below.
    assert calls["pack"] > 20 and calls["unpack"] > 0 and calls["pin"] == {False}


@pytest.mark.parametrize("backend", ["math", "flash"])
def test_attention_pin_picks_the_kernel_on_cpu(backend):
    flash = _aten._scaled_dot_product_flash_attention_for_cpu.default
    seen = {}
    for d in ({}, {"attention": backend}):
        with OpLog() as log:
            Trainer(CFG, toggles(d)).step()
        seen[bool(d)] = {op for op, _ in log.ops}
    assert flash in seen[False]  # unpinned, the CPU picks its fused kernel
    assert (flash in seen[True]) == (backend == "flash")
    if backend == "math":
        assert _aten.bmm.default in seen[True]  # QK^T and AV as plain batched matmuls


def test_compile_traces_the_model():
    graphs = []

    def count(gm, example_inputs):
        graphs.append(len(gm.graph.nodes))
        return gm.forward

    torch._dynamo.reset()
    losses = trainer_losses({"checkpointing": "full"}, steps=2, compile_backend=count)
    assert len(graphs) == 1 and graphs[0] > 20, graphs  # one graph: no breaks in the model
    assert losses == trainer_losses({}, steps=2)


# -- loss equivalence -----------------------------------------------------------------


@pytest.fixture(scope="module")
def baseline_losses():
    return trainer_losses()


EQUIVALENT = [
    ({"checkpointing": "full"}, FP32_RTOL),
    ({"checkpointing": "every:2"}, FP32_RTOL),
    ({"checkpointing": "selective"}, FP32_RTOL),
    ({"accumulation": 2}, FP32_RTOL),
    ({"accumulation": 4}, FP32_RTOL),
    ({"attention": "math"}, FP32_RTOL),
    ({"attention": "flash"}, FP32_RTOL),
    ({"offload": "on"}, FP32_RTOL),
    ({"optimizer": "adamw"}, FP32_RTOL),
    ({"compile": "aot_eager"}, FP32_RTOL),
    ({"precision": "bf16"}, HALF_RTOL),
    ({"precision": "fp16"}, HALF_RTOL),
    ({"precision": "bf16", "checkpointing": "selective", "accumulation": 2, "offload": "on"}, HALF_RTOL),
]


@pytest.mark.parametrize("d,rtol", EQUIVALENT, ids=lambda x: json.dumps(x) if isinstance(x, dict) else None)
def test_loss_matches_baseline(d, rtol, baseline_losses):
    """The same weights, batch and optimizer: a memory toggle may not change what is learned.

    The optimizer toggle's other values are left out: SGD learns differently by design."""
    if d.get("precision") == "fp16" and not precision.scaler_available(torch.device("cpu")):
        pytest.skip("no CPU GradScaler in this torch")
    if "compile" in d:
        torch._dynamo.reset()
    losses = trainer_losses(d)
    assert losses[-1] < losses[0]  # it still learns
    for got, want in zip(losses, baseline_losses):
        assert got == pytest.approx(want, rel=rtol), (losses, baseline_losses)


# -- bad combinations fail at start ----------------------------------------------------

BAD = [
    ({"accumulation": 3}, "cpu", "accumulation 3 does not divide the batch of 4"),
    ({"accumulation": 0}, "cpu", "use 2 or more micro-batches"),
    ({"accumulation": "two"}, "cpu", "not a whole number"),
    ({"optimizer": "adamw_fused"}, "cpu", "adamw_fused needs a cuda device"),
    ({"optimizer": "lion"}, "cpu", "optimizer 'lion' is not one of"),
    ({"attention": "efficient"}, "cpu", "attention efficient does not run on cpu"),
    ({"attention": "cudnn"}, "cpu", "attention cudnn does not run on cpu"),
    ({"attention": "flash"}, "cuda", "flash takes fp16/bf16 inputs only on cuda"),
    ({"attention": "cudnn"}, "cuda", "cudnn takes fp16/bf16 inputs only on cuda"),
    ({"attention": "sparse"}, "cpu", "attention 'sparse' is not one of"),
    ({"checkpointing": "every:0"}, "cpu", "k must be at least 1"),
    ({"checkpointing": "every"}, "cpu", "expected every:k"),
    ({"checkpointing": "full:2"}, "cpu", "only every:k takes a number"),
    ({"checkpointing": "some"}, "cpu", "checkpointing 'some' is not one of"),
    ({"precision": "fp8"}, "cpu", "precision 'fp8' is not one of fp32"),
    ({"offload": "maybe"}, "cpu", "offload: expected on or off"),
    ({"compile": 3}, "cpu", "compile: expected on, off or a backend name"),
    ({"alloc_conf": "expandable_segments"}, "cuda", "'expandable_segments' is not key:value"),
    ({"alloc_conf": "expandable_segments:True"}, "cpu", "configures the CUDA caching allocator"),
    ({"fsdp": "on"}, "cpu", "unknown training toggle"),
]


@pytest.mark.parametrize("d,device,message", BAD, ids=[m for _, _, m in BAD])
def test_bad_toggles_fail_at_construction(d, device, message):
    with pytest.raises(ValueError, match=message):
        from_dict(d, device=device, batch_size=CFG.batch_size)


def test_compile_refuses_cuda_graph_modes():
    with pytest.raises(ValueError, match="CUDA-graph modes"):
        CompileConfig(mode="reduce-overhead")


def test_off_values_and_round_trip():
    off = {
        "precision": "fp32",
        "accumulation": 1,
        "offload": "off",
        "compile": None,
        "checkpointing": "none",
        "attention": False,
    }
    assert from_dict(off) == TrainToggles()
    d = {
        "precision": "bf16",
        "checkpointing": "every:2",
        "accumulation": 2,
        "optimizer": "sgd",
        "attention": "math",
        "offload": "on",
        "compile": "aot_eager",
    }
    assert from_dict(d).to_dict() == d
    cuda = {
        "optimizer": "adamw_fused",
        "attention": "flash",
        "precision": "bf16",
        "alloc_conf": "expandable_segments:True",
        "compile": "on",
    }
    assert from_dict(cuda, device="cuda").to_dict() == cuda  # constructing needs no GPU


def test_allocator_checks_the_environment_it_cannot_set():
    conf = AllocatorConfig(alloc_conf="expandable_segments:True,max_split_size_mb:128")
    conf.apply({"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:128, expandable_segments:True"})
    conf.apply({"PYTORCH_ALLOC_CONF": "expandable_segments:True,max_split_size_mb:128"})
    for env in ({}, {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}):
        with pytest.raises(RuntimeError, match="the runner must start the process with PYTORCH_CUDA_ALLOC_CONF="):
            conf.apply(env)


def test_allocator_is_checked_before_the_model_is_touched(monkeypatch):
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    t = toggles({"checkpointing": "full"})
    t.allocator = AllocatorConfig(alloc_conf="expandable_segments:True")  # past the device check
    model = torch.nn.Module()  # no blocks: checkpointing would fail on it, after the allocator
    with pytest.raises(RuntimeError, match="is not in effect"):
        apply_toggles(t, model)


# -- on a GPU ---------------------------------------------------------------------------

_SDPA_OPS = {
    "flash": "aten::_scaled_dot_product_flash_attention",
    "efficient": "aten::_scaled_dot_product_efficient_attention",
    "cudnn": "aten::_scaled_dot_product_cudnn_attention",
}
# Kernel-name fragments that identify a backend (cuDNN's generated names vary by version).
_KERNEL_HINTS = {"flash": ("flash",), "efficient": ("fmha", "memeff", "efficient"), "cudnn": ()}


@gpu
@needs_cuda
@pytest.mark.parametrize("backend", sorted(_SDPA_OPS))
def test_gpu_pinned_sdpa_backend_is_used(backend):
    from torch.profiler import ProfilerActivity, profile

    trainer = Trainer(CFG, toggles({"precision": "bf16", "attention": backend}, "cuda"))
    try:
        trainer.step()  # warm-up: cuDNN builds its plan here
    except RuntimeError as e:
        if "No available kernel" in str(e):
            pytest.skip(f"{backend} SDPA is not available here: {str(e).splitlines()[0]}")
        raise
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        trainer.step()
        torch.cuda.synchronize()
    names = {e.name for e in prof.events()}
    assert _SDPA_OPS[backend] in names
    assert not ({op for b, op in _SDPA_OPS.items() if b != backend} & names)
    kernels = [e.name.lower() for e in prof.events() if e.device_type.name == "CUDA"]
    if _KERNEL_HINTS[backend]:
        assert any(h in k for k in kernels for h in _KERNEL_HINTS[backend]), kernels[:40]


def _train_cli(tmp_path, env, *extra):
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "workloads.train",
            "--preset",
            "tiny",
            "--steps",
            "2",
            "--device",
            "cuda",
            "--out",
            str(tmp_path),
            *extra,
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@gpu
@needs_cuda
def test_gpu_expandable_segments_map_pages(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")}
    proc = _train_cli(
        tmp_path,
        {**env, "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"},
        "--alloc-conf",
        "expandable_segments:True",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    trace = load_trace(json.loads(proc.stdout)["run_dir"])
    assert (trace.events["action"] == "segment_map").any()
    assert trace.meta["alloc_conf_env"] == "expandable_segments:True"
    # Without the variable the run refuses rather than mislabel a default-allocator run.
    proc = _train_cli(tmp_path, env, "--alloc-conf", "expandable_segments:True")
    res = json.loads(proc.stdout)
    assert proc.returncode == 1 and res["status"] == "error" and "runner must start" in res["error"]


@gpu
@needs_cuda
def test_gpu_offload_drops_device_activations(tmp_path):
    peaks = {}
    for name, d in (("base", {}), ("offload", {"offload": "on"})):
        res = run("tiny", d, out=str(tmp_path), name=name, steps=STEPS, device="cuda")
        assert res["status"] == "ok", res
        peaks[name] = peak_of(load_trace(res["run_dir"]), "activation")
    assert peaks["offload"] < peaks["base"] / 2, peaks


@gpu
@needs_cuda
def test_gpu_fp16_scaler_runs(tmp_path):
    trainer = Trainer(CFG, toggles({"precision": "fp16"}, "cuda"))
    scaler, calls = trainer.plan.scaler, []
    real_scale = scaler.scale
    scaler.scale = lambda loss: calls.append(1) or real_scale(loss)
    losses = [trainer.step().item() for _ in range(3)]
    assert len(calls) == 3 and scaler.get_scale() > 1 and all(math.isfinite(x) for x in losses)
    res = run("tiny", {"precision": "fp16"}, out=str(tmp_path), name="fp16", steps=STEPS, device="cuda")
    assert res["status"] == "ok", res


@gpu
@needs_cuda
@pytest.mark.parametrize(
    "d,rtol",
    [
        ({"optimizer": "adamw_fused"}, FP32_RTOL),
        ({"precision": "bf16", "attention": "flash"}, HALF_RTOL),
        ({"precision": "bf16", "attention": "efficient"}, HALF_RTOL),
        ({"precision": "bf16", "checkpointing": "selective"}, HALF_RTOL),
        ({"offload": "on", "checkpointing": "every:2"}, FP32_RTOL),
    ],
    ids=lambda x: json.dumps(x) if isinstance(x, dict) else None,
)
def test_gpu_loss_matches_baseline(d, rtol):
    base = trainer_losses(device="cuda")
    for got, want in zip(trainer_losses(d, device="cuda"), base):
        assert got == pytest.approx(want, rel=rtol)


@gpu
@needs_cuda
@pytest.mark.slow
def test_gpu_compile_runs_captured_without_module_hooks(tmp_path):
    base = run("tiny", {}, out=str(tmp_path), name="eager", steps=STEPS, device="cuda")
    res = run("tiny", {"compile": "on"}, out=str(tmp_path), name="compiled", steps=STEPS, device="cuda")
    assert res["status"] == "ok", res
    assert res["losses"] == pytest.approx(base["losses"], rel=1e-4)
    trace = load_trace(res["run_dir"])
    assert {"forward", "backward", "optimizer"} <= set(trace.phases["phase"].astype(str))
    assert peak_of(trace, "activation") > 0
    # Registered without module hooks; the allocator rounds each block up to 512 bytes.
    n_tensors = len(list(Trainer(CFG, toggles()).model.parameters()))
    assert _param_bytes() <= peak_of(trace, "parameter") <= _param_bytes() + 512 * n_tensors
