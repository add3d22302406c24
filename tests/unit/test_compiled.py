"""Layer names for inductor-generated code, without compiling: the line map built from a
hand-made GraphLowering, the renaming of drained tags, and a hook that never raises."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from profiler.capture import compiled
from profiler.capture.compiled_lines import LineInfo, line_infos, module_path
from profiler.capture.cuda import CudaBackend
from profiler.capture.frames import StackInterner
from profiler.capture.modules import ModuleTracer
from profiler.trace.finalize.markers import marker_tag


@pytest.mark.parametrize(
    "source, path",
    [
        ("L['self'].transformer.h[0]._orig_mod.attn", "transformer.h.0.attn"),
        ("getattr(L['self'].transformer.h, '3').mlp.c_fc", "transformer.h.3.mlp.c_fc"),
        ("L['self']._modules['transformer']._modules['h']['1']", "transformer.h.1"),
        ("L['self'].lm_head", "lm_head"),
        ("L['self']", ""),
        ("self.blocks.2", "blocks.2"),
    ],
)
def test_module_path_reads_dynamos_spellings(source, path):
    assert module_path(source) == path


class _Node:
    """A post-grad FX node: hashable, with the meta inductor reads."""

    def __init__(self, name, order, stack=None, fwd_stack=None, tag=None, op="call_function"):
        self.name, self.order, self.op, self.meta = name, order, op, {}
        if stack:
            self.meta["nn_module_stack"] = {f"k{i}": (s, object) for i, s in enumerate(stack)}
        if fwd_stack:
            self.meta["fwd_nn_module_stack"] = {f"k{i}": (s, object) for i, s in enumerate(fwd_stack)}
        if tag:
            self.meta["partitioner_tag"] = tag


class _Buffer:
    def __init__(self, *origins, origin_node=None):
        self.origins, self.origin_node = origins, origin_node

    def get_origins(self):
        return set(self.origins)


def _graph(nodes, buffers, backward=False):
    return SimpleNamespace(
        is_backward=backward,
        graph=SimpleNamespace(nodes=sorted(nodes, key=lambda n: n.order)),
        name_to_buffer=buffers,
    )


_CODE = """# AOT ID: ['0_forward']
import torch

def helper():
    buf0 = 1

def call(args):
    primals_1, = args
    buf0 = empty_strided_cuda((4, 4), (4, 1), torch.float32)
    buf1 = empty_strided_cuda((4, 4), (4, 1), torch.float32)
    buf2 = empty_strided_cuda((4, ), (1, ), torch.float32)
    extern_kernels.mm(buf0, buf1, out=buf3)
    (buf9,) = self.partitions[0](partition0_args)
    return (buf0, )

runner = None
"""


def test_forward_lines_take_their_buffers_modules():
    """origin_node first; else the latest origin with a module; none: the root ("")."""
    attn = "L['self'].h[0].attn"
    mm = _Node("mm", 4, stack=["L['self'].h[0]", "L['self'].h[0].mlp.c_fc"])
    plain, later = _Node("view", 1), _Node("addmm", 2, stack=["L['self'].h[0]", attn])
    loss = _Node("sum_1", 3)
    buffers = {"buf0": _Buffer(origin_node=later), "buf1": _Buffer(plain, later), "buf2": _Buffer(loss)}
    graph = _graph([mm, plain, later, loss], buffers)
    # The context map counts lines before a 2-line prefix was prepended.
    infos = line_infos(graph, _CODE, line_map=[(10, SimpleNamespace(context=mm))], shift=2)
    lines = _CODE.split("\n")
    at = {lines[n - 1].strip().split(" ")[0]: info for n, info in infos.items()}
    assert at["buf0"] == at["buf1"] == LineInfo("h.0.attn", "forward", False)
    assert at["buf2"] == LineInfo("", "forward", False)
    assert at["extern_kernels.mm(buf0,"] == LineInfo("h.0.mlp.c_fc", "forward", False)
    assert "(buf9,)" not in at  # graph partitions' machinery is no layer's
    assert all(lines[n - 1].startswith("    ") for n in infos)  # helper() is not call(): only call's lines
    assert min(infos) > lines.index("def call(args):")


def test_backward_lines_take_the_forward_module_and_flag_recomputation():
    grad = _Node("mm_5", 1, fwd_stack=["L['self'].h[1]", "L['self'].h[1].mlp.c_fc"])
    recomputed = _Node("gelu", 2, stack=["L['self'].h[1].mlp.gelu"], tag="is_forward")
    graph = _graph([grad, recomputed], {"buf0": _Buffer(grad), "buf1": _Buffer(recomputed)}, backward=True)
    infos = line_infos(graph, _CODE)
    assert infos[9] == LineInfo("h.1.mlp.c_fc", "backward", False)
    assert infos[10] == LineInfo("h.1.mlp.gelu", "backward", True)


def _tags(child_name=lambda outer, rel: rel):
    tags = compiled.CompiledTags(child_name)
    tags.see_stack(0, [{"filename": "gen.py", "line": 9}, {"filename": "train.py", "line": 3}])
    tags.see_stack(1, [{"filename": "/usr/lib/torch/x.py", "line": 2}, {"filename": "gen.py", "line": 10}])
    tags.see_stack(2, [{"filename": "train.py", "line": 3}])
    return tags


@pytest.fixture
def generated(monkeypatch):
    infos = {9: LineInfo("h.0.attn", "forward", False), 10: LineInfo("h.1.mlp.gelu", "backward", True)}
    monkeypatch.setitem(compiled._maps, "gen.py", infos)
    monkeypatch.setitem(compiled._maps, "root.py", {1: LineInfo("", "backward", False)})


@pytest.mark.parametrize(
    "tag, sid, renamed",
    [
        ("forward|GPT|", 0, "forward|h.0.attn|"),  # the innermost frame is mapped
        ("backward|GPT|activation", 1, "recompute|h.1.mlp.gelu|activation"),  # an outer frame is
        ("|GPT|", 0, "forward|h.0.attn|"),
        ("recompute|GPT|", 0, "recompute|h.0.attn|"),  # the runtime's own phases win
        ("optimizer|GPT|", 0, "optimizer|h.0.attn|"),
        ("eval|GPT|", 0, "eval|h.0.attn|"),
        ("forward||", 0, "forward||"),  # no compiled callable on the tag: nothing to anchor to
        ("forward|GPT|", 2, "forward|GPT|"),  # no mapped frame
        ("forward|GPT|", None, "forward|GPT|"),  # no stack
        (marker_tag(3, 1), 0, marker_tag(3, 1)),
        ("", 0, ""),
    ],
)
def test_drained_tags_are_renamed_from_their_stacks(generated, tag, sid, renamed):
    assert _tags().retag([tag], [sid]) == [renamed]


def test_a_map_joins_the_module_the_graph_ran_in(generated):
    tags = _tags(lambda outer, rel: f"{outer}.{rel}")
    tags.see_stack(3, [{"filename": "root.py", "line": 1}])
    out = tags.retag(["forward|transformer.h.3|", "backward|transformer.h.3|"], [0, 3])
    assert out == ["forward|transformer.h.3.h.0.attn|", "backward|transformer.h.3|"]


class _Recorder:
    def on_new_root(self, module, root_name, prefix, called=None):
        pass

    def on_new_module(self, module, name, parent, depth):
        pass


def test_compiled_child_names_below_roots_and_submodules():
    tracer = ModuleTracer(_Recorder(), lambda tag: None, lambda: "")
    first, second = tracer.register_root(torch.nn.Linear(2, 2)), tracer.register_root(torch.nn.Linear(2, 2))
    assert (first, second) == ("Linear", "Linear#2")
    assert tracer.compiled_child("Linear", "h.0.attn") == "h.0.attn"
    assert tracer.compiled_child("Linear#2", "h.0.attn") == "Linear#2.h.0.attn"
    assert tracer.compiled_child("transformer.h.3", "attn.c_attn") == "transformer.h.3.attn.c_attn"


def test_the_cuda_drain_renames_allocations_made_on_mapped_lines(generated, monkeypatch):
    backend = CudaBackend.__new__(CudaBackend)  # no device: the allocator is faked below
    backend.index, backend.stacks, backend.interner = 0, True, StackInterner()
    backend.events_seen = backend.dropped = backend._allocs_seen = backend._allocs_at_start = 0
    backend.compiled = compiled.CompiledTags(lambda outer, rel: rel)
    gen = [{"filename": "gen.py", "line": 9, "name": "call"}, {"filename": "train.py", "line": 3, "name": "<module>"}]
    eager = [{"filename": "train.py", "line": 4, "name": "<module>"}]
    trace = [
        dict(time_us=1, action="alloc", addr=16, size=512, stream=0, user_metadata="forward|GPT|", frames=gen),
        dict(time_us=2, action="alloc", addr=32, size=512, stream=0, user_metadata="forward|GPT|", frames=eager),
        dict(time_us=3, action="free_requested", addr=16, size=512, stream=0, user_metadata="forward|GPT|", frames=gen),
    ]
    monkeypatch.setattr(backend, "_enable", lambda clear, stacks=None: None)
    monkeypatch.setattr(torch._C, "_cuda_memorySnapshot", lambda _: {"device_traces": [trace], "segments": []}, False)
    monkeypatch.setattr(torch._C, "_cuda_memoryStats", lambda _: {}, False)
    cols = backend._drain(step=0)
    assert cols["tag"] == ["forward|h.0.attn|", "forward|GPT|", "forward|h.0.attn|"]
    assert cols["stack_id"][0] == cols["stack_id"][2] != cols["stack_id"][1]


def test_the_hook_keeps_its_failures_and_never_raises(monkeypatch):
    hook = compiled.CompileHook()
    monkeypatch.setattr(compiled, "_lowering_patched", False)
    monkeypatch.setattr(compiled, "_hooks", [hook])  # a capture running
    compiled.patch_lowering(SimpleNamespace())  # an inductor without GraphLowering
    broken = SimpleNamespace()  # a "generated module" without __file__
    wrapped = compiled._with_line_map(lambda graph, code: broken, with_lines=True)
    assert wrapped(SimpleNamespace(), SimpleNamespace(value="x\n", line_map=[])) is broken
    assert len(hook.errors) == 2 and hook.errors[0].startswith("install:") and hook.errors[1].startswith("record:")
    assert hook.meta() == {"compile_attribution_errors": hook.errors}
    monkeypatch.setattr(compiled, "_hooks", [])  # no capture: the next one reports it
    monkeypatch.setattr(compiled, "_errors", [])
    wrapped(SimpleNamespace(), SimpleNamespace(value="x\n", line_map=[]))
    assert len(compiled._errors) == 1 and compiled._errors[0].startswith("record:")
