"""Which layer each line of an inductor-generated wrapper works for.

Inductor turns a compiled graph into a Python file whose `call()` allocates every
buffer (`buf7 = empty_strided_cuda(...)`) and launches the kernels. Once the file is
written, the GraphLowering that wrote it still knows, for each `bufN`, the FX nodes
it came from, and each FX node carries the module that made it:

- forward nodes: `nn_module_stack`, {key: (dynamo source, class)}, outermost first;
- backward nodes: `fwd_nn_module_stack`, copied by AOTAutograd from the forward node
  with the same `seq_nr`; a forward node the partitioner re-runs inside backward
  (`partitioner_tag == "is_forward"`) keeps `nn_module_stack`: a recomputation.

A line that assigns `bufN` takes the module of bufN's origin (its `origin_node` when
that has a module, else the latest origin in graph order that has one; none: the
compiled callable's own code, module ""). Any other line of `call()` takes the
module of the scheduler node inductor was generating there (the wrapper's
`line_map`), e.g. an `extern_kernels.mm(..., out=buf3)` that allocates a workspace.

Module paths are relative to the compiled callable: "" is its root.
"""

from __future__ import annotations

import bisect
import re
from typing import Any, NamedTuple

from profiler.capture.modules import user_path
from profiler.trace.schema import Phase


class LineInfo(NamedTuple):
    module: str  # relative to the compiled callable; "" is the callable's own code
    phase: str  # forward or backward
    recompute: bool  # a forward op the backward graph re-runs


_FORWARD, _BACKWARD = Phase.FORWARD.value, Phase.BACKWARD.value
# Dynamo's spellings of a module's source: getattr(L['self'].h, '0'), L['self'].h[0], ._modules['h'].
_GETATTR = re.compile(r"getattr\(([^()]*?),\s*['\"]([^'\"]+)['\"]\)")
_LOCAL = re.compile(r"^(?:[LG]\[['\"][^'\"]+['\"]\]|self)")
_SUBSCRIPT = re.compile(r"(?:\._modules)?\[['\"]?([^'\"\]]+)['\"]?\]")
_ASSIGN = re.compile(r"^\s+(buf\d+)\s*=")
_DEF = re.compile(r"^(\s*)def (call|partition_\d+)\(")
# Graph partitions (CUDA graphs) are called from call(); what is allocated there is
# the partition machinery's, not a layer's: such lines stay unmapped.
_PARTITION_CALL = re.compile(r"=\s*self\.partitions\[\d+\]\(")


def module_path(source: str) -> str:
    """A dynamo source ("L['self'].transformer.h[0]._orig_mod.attn") as a module path
    relative to the compiled callable ("transformer.h.0.attn")."""
    path = source
    while True:
        unwrapped = _GETATTR.sub(r"\1.\2", path)
        if unwrapped == path:
            break
        path = unwrapped
    path = _SUBSCRIPT.sub(r".\1", _LOCAL.sub("", path))
    return user_path(".".join(p for p in path.split(".") if p))


def _innermost(stack) -> str | None:
    """The innermost module of an nn_module_stack; None when the node has none."""
    if not stack:
        return None
    entry = list(stack.values())[-1]
    return module_path(str(entry[0] if isinstance(entry, tuple) else entry))


def node_module(node, backward: bool) -> tuple[str | None, bool]:
    """(module, recompute) of a post-grad FX node; module None: the node carries none."""
    meta = getattr(node, "meta", None) or {}
    if backward and meta.get("partitioner_tag") != "is_forward":
        return _innermost(meta.get("fwd_nn_module_stack") or meta.get("nn_module_stack")), False
    return _innermost(meta.get("nn_module_stack")), backward


def _buffer_module(buf, order: dict, backward: bool) -> tuple[str, bool] | None:
    """(module, recompute) for a buffer, from its origin nodes; None without origins."""
    origin = getattr(buf, "origin_node", None)
    if origin is not None:
        module, recompute = node_module(origin, backward)
        if module is not None:
            return module, recompute
    try:
        origins = sorted(buf.get_origins(), key=lambda n: order.get(n, -1), reverse=True)
    except Exception:  # a buffer kind without origins
        origins = []
    origins = [n for n in origins if getattr(n, "op", "") not in ("output", "placeholder", "get_attr")]
    for node in origins:
        module, recompute = node_module(node, backward)
        if module is not None:
            return module, recompute
    return ("", False) if origins else None  # only the callable's own ops (arange, the loss)


def _bodies(lines: list[str]) -> list[range]:
    """1-based line numbers of the bodies of `def call(` and `def partition_N(`."""
    out = []
    i = 0
    while i < len(lines):
        m = _DEF.match(lines[i])
        i += 1
        if not m:
            continue
        start, indent = i, len(m.group(1))
        while i < len(lines):
            text = lines[i].lstrip()
            if text and not text.startswith("#") and len(lines[i]) - len(text) <= indent:
                break
            i += 1
        out.append(range(start + 1, i + 1))
    return out


def _context(line_map, shift: int, backward: bool) -> tuple[list[int], list[tuple[str, bool]]]:
    """The wrapper's line map as sorted first lines and the (module, recompute) from each."""
    starts: list[int] = []
    modules: list[tuple[str, bool]] = []
    for line, ctx in line_map or ():
        node = getattr(ctx, "context", ctx)
        if node is None or not hasattr(node, "meta"):
            continue
        module, recompute = node_module(node, backward)
        starts.append(line + shift)
        modules.append((module or "", recompute))
    return starts, modules


def line_infos(graph: Any, code: str, line_map=None, shift: int = 0) -> dict[int, LineInfo]:
    """{line: LineInfo} for the lines of call() (and graph partitions) in `code`, the source
    that `graph` (a GraphLowering) generated. `line_map` is the wrapper's [(line, LineContext)],
    counted before `shift` lines were prepended to the source."""
    backward = bool(getattr(graph, "is_backward", False))
    phase = _BACKWARD if backward else _FORWARD
    fx_graph = getattr(graph, "graph", None)
    order = {n: i for i, n in enumerate(fx_graph.nodes)} if fx_graph is not None else {}
    buffers = getattr(graph, "name_to_buffer", None) or {}
    starts, contexts = _context(line_map, shift, backward)
    lines = code.split("\n")
    out: dict[int, LineInfo] = {}
    for body in _bodies(lines):
        for n in body:
            text = lines[n - 1]
            if not text.strip() or _PARTITION_CALL.search(text):
                continue
            found = None
            assign = _ASSIGN.match(text)
            if assign and assign.group(1) in buffers:
                found = _buffer_module(buffers[assign.group(1)], order, backward)
            if found is None and starts:
                k = bisect.bisect_right(starts, n) - 1
                found = contexts[k] if k >= 0 else None
            if found is not None:
                out[n] = LineInfo(found[0], phase, found[1])
    return out
