"""The layout the README promises, checked on the source: imports run one way, analysis is
pure, and files and functions stay a readable size.

Everything here reads the code with `ast`; nothing is imported or run.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("profiler", "workloads", "dashboard")
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 60
# A file or function may be longer when its docstring says why, with this marker.
LONG_MARKER = "(long:"

# Calls that reach the file system. analysis/ takes a Trace or DataFrame and returns one.
FILE_CALLS = {
    "open",
    "read_text",
    "read_bytes",
    "write_text",
    "write_bytes",
    "iterdir",
    "glob",
    "rglob",
    "exists",
    "is_dir",
    "is_file",
    "listdir",
    "scandir",
    "read_table",
    "read_parquet",
    "load_trace",
    "load_runs",
    "iter_runs",
    "mkdir",
    "unlink",
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@cache
def _sources() -> dict[str, tuple[Path, ast.Module]]:
    found = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            found[_module_name(path)] = (path, ast.parse(path.read_text(), filename=str(path)))
    return found


def _runtime_nodes(tree: ast.Module):
    """Every node, except those under `if TYPE_CHECKING:` (imports for annotations only)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            test = child.test if isinstance(child, ast.If) else None
            if isinstance(test, ast.Name) and test.id == "TYPE_CHECKING":
                stack.extend(child.orelse)
                continue
            stack.append(child)


def _imports(module: str, tree: ast.Module) -> set[str]:
    """Every project module this one imports at run time, at the top or inside a function."""
    known = _sources()
    is_package = known[module][0].name == "__init__.py"
    out = set()
    for node in _runtime_nodes(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")
                anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
                base = ".".join(anchor + ([base] if base else []))
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:  # `import a.b.c` also imports a.b and a
                name = name.rpartition(".")[0]
            if name and name != module:
                out.add(name)
    return out


def _graph() -> dict[str, set[str]]:
    return {m: _imports(m, tree) for m, (_, tree) in _sources().items()}


def _in(module: str, room: str) -> bool:
    return module == room or module.startswith(room + ".")


def test_profiler_never_imports_workloads_or_the_dashboard():
    bad = [
        (m, d)
        for m, deps in _graph().items()
        if _in(m, "profiler")
        for d in deps
        if _in(d, "workloads") or _in(d, "dashboard")
    ]
    assert not bad


def test_no_dashboard_module_imports_the_cli():
    bad = [(m, d) for m, deps in _graph().items() if _in(m, "dashboard") for d in deps if _in(d, "profiler.cli")]
    assert not bad


def test_analysis_never_touches_a_file():
    bad = []
    for module, (path, tree) in _sources().items():
        if not _in(module, "profiler.analysis"):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                f = node.func
                name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None
                if name in FILE_CALLS:
                    bad.append(f"{path.relative_to(REPO)}:{node.lineno} {name}()")
    assert not bad


def test_no_import_cycles():
    graph = _graph()
    cycles = [c for c in _strongly_connected(graph) if len(c) > 1]
    assert not cycles


def _strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative (the graph has a few hundred modules)."""
    index, low, on_stack, stack, out = {}, {}, set(), [], []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    out.append(component)
    return out


def _says_why(node) -> bool:
    doc = ast.get_docstring(node) or ""
    return LONG_MARKER in doc


def test_files_stay_short():
    long_files = []
    for path, tree in _sources().values():
        lines = len(path.read_text().splitlines())
        if lines > MAX_FILE_LINES and not _says_why(tree):
            long_files.append(f"{path.relative_to(REPO)}: {lines} lines")
    assert not long_files


def test_functions_stay_short():
    long_functions = []
    for path, tree in _sources().values():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES and not _says_why(node):
                    long_functions.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name}: {lines} lines")
    assert not long_functions


@pytest.mark.parametrize(
    "bad, expected",
    [
        ({"a": {"b"}, "b": {"a"}}, [["a", "b"]]),
        ({"a": {"b"}, "b": {"c"}, "c": set()}, []),
    ],
)
def test_the_cycle_finder_finds_cycles(bad, expected):
    found = [sorted(c) for c in _strongly_connected(bad) if len(c) > 1]
    assert found == expected
