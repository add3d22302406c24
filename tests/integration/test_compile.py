"""torch.compile under the capture on the CPU: module names, exact parameter and AdamW
bytes, the hook on inductor's generated code, and no recompile caused by the capture.

Under the CPU backend (a TorchDispatchMode) dynamo skips compiled frames and the model
runs eagerly: names come from the module tracer. Where dynamo must really compile
(recompile counts), the capture runs with a CPU backend that leaves its dispatch mode
out; the module tracer, the hooks and the steps are the session's own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from nanogpt import GPT, batch, train

import profiler
from profiler.capture import compiled, session
from profiler.capture.cpu import CpuBackend
from profiler.trace.reader import load_trace

REPO = Path(__file__).resolve().parents[2]
USER_MODULES = {"GPT", "transformer.h.0.attn.c_attn", "transformer.h.1.mlp.c_fc", "lm_head", "transformer.ln_f"}


def _model():
    torch.manual_seed(0)
    model = GPT(n_layer=2)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


@pytest.fixture(autouse=True)
def _forget_compiles():
    """Later captures in this process must not see these tests' compiles: the capture keeps
    module hooks as they are once dynamo has compiled anything in the process."""
    yield
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()


@pytest.fixture(scope="module")
def compiled_run(tmp_path_factory):
    model, opt = _model()
    inputs, targets = batch(model)
    with profiler.profile(out=tmp_path_factory.mktemp("traces"), name="compiled", backend="cpu") as prof:
        train(torch.compile(model), opt, 3, inputs, targets)
    return load_trace(prof.run_dir), model, opt


def test_compiled_model_keeps_the_users_module_names(compiled_run):
    trace, _, _ = compiled_run
    names = set(trace.modules["module"])
    assert USER_MODULES <= names
    assert not {n for n in names if "_orig_mod" in n or "OptimizedModule" in n}
    assert trace.modules.set_index("module").loc["GPT", "class_name"] == "GPT"
    allocs = trace.events[trace.events["action"] == "alloc"]
    assert not allocs["module"].dropna().astype(str).str.contains("_orig_mod|OptimizedModule").any()
    for phase, module in (("forward", "transformer.h.0.attn.c_attn"), ("backward", "transformer.h.1.mlp.c_fc")):
        made = allocs[(allocs["phase"] == phase) & (allocs["module"] == module)]
        assert made["size_bytes"].sum() > 0, (phase, module)
    assert allocs[allocs["phase"] == "backward"]["module"].nunique() > 10


def test_parameters_and_adamw_states_are_exact_and_named(compiled_run):
    trace, model, opt = compiled_run
    numel = sum(p.numel() for p in model.parameters())  # wte and lm_head share one weight
    roles, ev = trace.roles, trace.events
    params = roles[(roles["role"] == "parameter") & (roles["step"] == 0)]
    assert set(params["name"]) == {n for n, _ in model.named_parameters()}
    assert "transformer.h.0.attn.c_attn.weight" in set(params["name"])
    assert params["size_bytes"].sum() == numel * 4
    assert ev[(ev["action"] == "alloc") & (ev["category"] == "parameter")]["size_bytes"].sum() == numel * 4
    states = roles[roles["role"] == "optimizer_state"]
    moments = states[states["name"].str.endswith((".exp_avg", ".exp_avg_sq"))]
    assert moments["size_bytes"].sum() == 2 * numel * 4
    assert "transformer.h.1.mlp.c_fc.weight.exp_avg" in set(moments["name"])
    step_bytes = sum(s["step"].nbytes for s in opt.state.values())
    made = ev[(ev["action"] == "alloc") & (ev["category"] == "optimizer_state")]
    assert made["size_bytes"].sum() == 2 * numel * 4 + step_bytes


def test_a_compiled_submodule_is_named_as_the_user_named_it(tmp_path):
    model, opt = _model()
    model.transformer.h[1] = torch.compile(model.transformer.h[1])
    inputs, targets = batch(model)
    with profiler.profile(out=tmp_path, backend="cpu") as prof:
        train(model, opt, 1, inputs, targets)
    trace = load_trace(prof.run_dir)
    rows = trace.modules.set_index("module")
    assert rows.loc["transformer.h.1", "class_name"] == "Block"
    assert {"transformer.h.1.attn.c_attn", "transformer.h.1.mlp.c_fc"} <= set(rows.index)
    assert not rows.index.str.contains("_orig_mod").any()
    assert "transformer.h.1.attn.c_attn.weight" in set(trace.roles["name"])
    allocs = trace.events[trace.events["action"] == "alloc"]
    assert (allocs["module"] == "transformer.h.1.mlp.c_fc").any()


class _DispatchFreeBackend(CpuBackend):
    """The CPU backend without its dispatch mode, so that dynamo compiles under the capture."""

    def start(self) -> dict:
        return dict(device="cpu", allocator_settings=None, baseline_allocated_bytes=0, baseline_reserved_bytes=None)

    def stop(self) -> None:
        pass


def _compile_counts(steps: int, capture_dir=None, after: int = 0, **options) -> dict:
    """Compile counts of `steps` steps of a fresh compiled model (under a capture when
    `capture_dir` is given), then `after` more steps once the capture has ended."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model, opt = _model()
    cmodel = torch.compile(model, backend="aot_eager")
    inputs, targets = batch(model)
    if capture_dir is None:
        train(cmodel, opt, steps, inputs, targets)
    else:
        with profiler.profile(out=capture_dir, backend="cpu", **options) as prof:
            train(cmodel, opt, steps, inputs, targets)
        options["hooked"] = load_trace(prof.run_dir).steps["modules_hooked"].tolist()
    train(cmodel, opt, after, inputs, targets)
    return dict(frames=dict(counters["frames"]), graphs=counters["stats"]["unique_graphs"], **options)


@pytest.mark.parametrize("hooked_steps", [(3, 50), (1, 2)])
def test_the_capture_causes_no_recompile(tmp_path, monkeypatch, hooked_steps):
    """Module hooks run in the first steps and in sampled ones only, also for a compiled
    model (dynamo runs the wrapper as it is, so turning them off changes nothing it guards
    on), and the wrapper stays after the capture: the compile counts, in the capture and
    after it, match a run without capture."""
    monkeypatch.setattr(session, "make_backend", lambda *a, **k: _DispatchFreeBackend(stacks=True))
    plain = _compile_counts(8)
    captured = _compile_counts(6, tmp_path, after=2, hooked_steps=hooked_steps)
    print(f"compiles: plain {plain} | captured {captured}")
    assert plain["graphs"] == captured["graphs"] == 1
    assert plain["frames"] == captured["frames"]
    assert captured["hooked"][0] and not all(captured["hooked"])


_HOOK_LIFECYCLE = """
import os, sys, tempfile, torch, profiler
from profiler.capture import import_hooks

watching = os.environ.get("VRAMSCOPE_COMPILE_MAPS") != "0"
assert import_hooks.waiting().get("torch._inductor.graph") == (1 if watching else None)
with profiler.profile(out=tempfile.mkdtemp(), backend="cpu"):
    assert "torch._inductor.graph" in import_hooks.waiting()
    torch.nn.Linear(2, 2)(torch.randn(1, 2)).sum().backward()
assert "torch._inductor.graph" not in sys.modules, "the capture imported inductor"
assert import_hooks.waiting().get("torch._inductor.graph") == (1 if watching else None)
with profiler.profile(out=tempfile.mkdtemp(), backend="cpu"):
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config
    from torch._inductor.graph import GraphLowering
    assert GraphLowering._compile_to_module_lines.__name__ == "compile_with_line_map"
    assert inductor_config.fx_graph_cache is False and functorch_config.enable_autograd_cache is False
    assert "torch._inductor.graph" not in import_hooks.waiting()
# The lowering keeps recording (a later capture names what is compiled now); caches are back.
assert GraphLowering._compile_to_module_lines.__name__ == "compile_with_line_map"
assert inductor_config.fx_graph_cache is True and functorch_config.enable_autograd_cache is True
with profiler.profile(out=tempfile.mkdtemp(), backend="cpu"):  # inductor imported already
    assert inductor_config.fx_graph_cache is False and "torch._inductor.graph" not in import_hooks.waiting()
assert inductor_config.fx_graph_cache is True and "torch._inductor.graph" not in import_hooks.waiting()
print("ok")
"""


@pytest.mark.parametrize("watch", ["1", "0"])
def test_the_hook_waits_for_inductor_and_bypasses_its_caches_only_in_a_capture(tmp_path, watch):
    env = {k: v for k, v in os.environ.items() if not k.startswith("TORCHINDUCTOR_")}  # caches on by default
    env.update(PYTHONPATH=str(REPO), VRAMSCOPE_COMPILE_MAPS=watch, VRAMSCOPE_MAP_DIR=str(tmp_path / "maps"))
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(_HOOK_LIFECYCLE)], env=env, capture_output=True)
    assert out.returncode == 0, out.stderr.decode()[-3000:]
    assert out.stdout.decode().strip() == "ok"


_WRAPPER_WAITS_ONCE = """
import sys, tempfile, torch, profiler
from profiler.capture import import_hooks

model = torch.nn.Linear(2, 2)
with profiler.profile(out=tempfile.mkdtemp(), backend="cpu", hooked_steps=(1, 2)) as prof:
    for _ in range(9):  # hooks go on and off at every other step
        model(torch.randn(1, 2)).sum().backward()
        prof.step()
if "torch._dynamo.eval_frame" in sys.modules:
    print("imported")
else:
    print(import_hooks.waiting().get("torch._dynamo.eval_frame"))
"""


def test_the_module_call_wrapper_waits_for_dynamo_once_however_often_it_goes_in():
    """Until dynamo is imported, the wrapper's frame strategies wait for it: one callback,
    not one per hooked step of a long capture."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(_WRAPPER_WAITS_ONCE)], env=env, capture_output=True)
    assert out.returncode == 0, out.stderr.decode()[-3000:]
    got = out.stdout.decode().strip()
    if got == "imported":
        pytest.skip("this torch imports dynamo with the optimizer or autograd")
    assert got == "1"


@pytest.mark.slow
def test_inductor_lines_name_forward_and_backward_modules():
    """A real inductor compile on the CPU: every allocation the generated code makes is
    on a mapped line, whose module is the user's, in forward and in backward."""
    from torch._inductor.codecache import PyCodeCache

    hook = compiled.CompileHook()
    hook.install()
    try:
        torch._dynamo.reset()
        model, _ = _model()
        cmodel = torch.compile(model)
        inputs, targets = batch(model, seq_len=8)
        cmodel(inputs, targets)[1].backward()  # compiles forward and backward
    finally:
        hook.remove()
    assert not hook.errors and hook.graphs == 2
    files = [m for m in PyCodeCache.modules if os.path.realpath(m.__file__) in compiled.mapped_files()]
    seen = _allocation_lines(files, lambda: cmodel(inputs, targets)[1].backward())
    infos = [compiled.lookup(f, line) for f, line in seen]
    assert seen and None not in infos
    named = {(i.phase, i.module) for i in infos}
    for phase in ("forward", "backward"):
        assert {(phase, "transformer.h.0.attn.c_attn"), (phase, "transformer.h.1.mlp.c_fc")} <= named
        assert (phase, "lm_head") in named
    assert not {m for _, m in named if "_orig_mod" in m}
    tags = compiled.CompiledTags(lambda outer, rel: rel)  # the first root's children: no prefix
    for sid, (f, line) in enumerate(seen):
        tags.see_stack(sid, [{"filename": "other.py", "line": 1}, {"filename": f, "line": line}])
    renamed = tags.retag(["forward|GPT|"] * len(seen), list(range(len(seen))))
    assert "forward|transformer.h.0.attn.c_attn|" in renamed


def _allocation_lines(modules, run) -> list[tuple[str, int]]:
    """(file, line) of each empty_strided_cpu call the generated modules make while `run` runs."""
    seen: list[tuple[str, int]] = []
    saved = []
    for mod in modules:
        original = mod.empty_strided_cpu

        def recording(*args, _original=original, **kwargs):
            caller = sys._getframe(1)
            seen.append((caller.f_code.co_filename, caller.f_lineno))
            return _original(*args, **kwargs)

        saved.append((mod, original))
        mod.empty_strided_cpu = recording
    try:
        run()
    finally:
        for mod, original in saved:
            mod.empty_strided_cpu = original
    return seen


_COMPILED_BEFORE = """
import json, os, sys, tempfile
sys.path[:0] = [os.environ["TESTS"], os.path.join(os.environ["TESTS"], "integration")]
import torch
import profiler
from torch._dynamo.utils import counters
from torch._inductor.codecache import PyCodeCache
from nanogpt import batch, train
from profiler.capture import compiled, session
from test_compile import _DispatchFreeBackend, _allocation_lines, _model

session.make_backend = lambda *a, **k: _DispatchFreeBackend(stacks=True)
model, opt = _model()
cmodel = torch.compile(model)
inputs, targets = batch(model)
train(cmodel, opt, 2, inputs, targets)  # compiled, forward and backward, before any capture
before = [counters["frames"]["total"], counters["stats"]["unique_graphs"]]
with profiler.profile(out=tempfile.mkdtemp(), backend="cpu") as prof:
    files = [m for m in PyCodeCache.modules if compiled.file_map(m.__file__)]
    seen = _allocation_lines(files, lambda: train(cmodel, opt, 2, inputs, targets))
after = [counters["frames"]["total"], counters["stats"]["unique_graphs"]]
infos = [compiled.lookup(f, line) for f, line in seen]
meta = json.loads((prof.run_dir / "meta.json").read_text())
print(json.dumps(dict(
    compiles=[before, after], generated=len(PyCodeCache.modules), mapped=len(files), allocations=len(seen),
    named=sorted({(i.phase, i.module) for i in infos if i is not None}), unnamed=infos.count(None),
    attribution=meta.get("compile_attribution"),
)))
"""


@pytest.mark.slow
def test_a_model_compiled_before_the_capture_keeps_its_code_and_its_layer_names(tmp_path):
    """Compiled and trained before the capture, in a process that imported vramscope: the
    capture compiles nothing (no frame, no graph), and every allocation the generated code
    makes in it is on a line mapped to the user's module. A second process compiles from
    inductor's warm cache, which skips the lowering: the maps come from vramscope's store."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHINDUCTOR_", "VRAMSCOPE_"))}
    env.update(
        PYTHONPATH=str(REPO),
        TESTS=str(REPO / "tests"),
        TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"),
        VRAMSCOPE_MAP_DIR=str(tmp_path / "maps"),
    )
    runs = []
    for _ in ("cold inductor cache", "warm inductor cache"):
        out = subprocess.run([sys.executable, "-c", textwrap.dedent(_COMPILED_BEFORE)], env=env, capture_output=True)
        assert out.returncode == 0, out.stderr.decode()[-3000:]
        runs.append(json.loads(out.stdout.decode().strip().splitlines()[-1]))
    print(runs)
    cold, warm = runs
    for run in runs:
        (frames, graphs), after = run["compiles"]
        assert (frames, graphs) == (1, 1) and after == [1, 1]  # dynamo's one graph; none added by the capture
        assert run["generated"] == run["mapped"] == 2  # inductor's forward and backward
        assert run["allocations"] > 0 and run["unnamed"] == 0
        named = {tuple(n) for n in run["named"]}
        for phase in ("forward", "backward"):
            assert {(phase, "transformer.h.0.attn.c_attn"), (phase, "lm_head")} <= named
    assert cold["named"] == warm["named"]
    assert cold["attribution"]["graphs_before"] == 2 and cold["attribution"]["graphs"] == 0
    assert warm["attribution"]["graphs_before"] == 0 and warm["attribution"]["graphs_stored"] == 2
    assert len(list((tmp_path / "maps").glob("*.json"))) == 2
