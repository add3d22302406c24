"""The `vramscope` command line: one module per verb, registered in `_COMMANDS`.

Each verb module under profiler/cli/ exposes NAME, HELP (the first line of its
docstring), add_arguments(parser) and run(args) -> int. Only the verb being run
is imported, so that `vramscope run` keeps pandas and the analysis code out of
the profiled process; the other verbs' help lines are read from their source.

Other packages add verbs, with the same four names, through the entry point group
"vramscope.verbs" (name: the verb; value: its module), e.g. `ablate = "workloads.ablate_cli"`.
They are looked up only when the first word is not a built-in verb.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import os
import sys

from profiler.errors import UsageError, VramscopeError

PROG = "vramscope"

# (verb, module). The order is the order `vramscope --help` lists them in; other
# packages' verbs follow, by name.
_COMMANDS: list[tuple[str, str]] = [
    ("run", "profiler.cli.run"),
    ("report", "profiler.cli.report"),
    ("info", "profiler.cli.info"),
    ("dashboard", "profiler.cli.dashboard"),
    ("import", "profiler.cli.import_"),
    ("export", "profiler.cli.export"),
    ("estimate", "profiler.cli.estimate"),
    ("whatif", "profiler.cli.whatif"),
    ("explain", "profiler.cli.explain"),
    ("leaks", "profiler.cli.leaks"),
    ("diff", "profiler.cli.diff"),
]

PLUGIN_GROUP = "vramscope.verbs"

EXIT_INTERRUPTED = 130  # what a shell reports for SIGINT
EXIT_BROKEN_PIPE = 141  # what a shell reports for SIGPIPE


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    try:
        code = _outcome(argv)
        # What is still buffered meets a closed pipe here, not in Python's own flush at exit,
        # which would print an "Exception ignored" traceback.
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        _drop_stdout()
        return EXIT_BROKEN_PIPE


def _outcome(argv: list[str]) -> int:
    try:
        return _main(argv)
    except VramscopeError as exc:
        _print_error(str(exc))
        return exc.exit_code
    except KeyboardInterrupt:
        print(file=sys.stderr)  # end the line a ^C left half-written
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `vramscope report RUN | head`: the reader has what it wanted
        _drop_stdout()
        return EXIT_BROKEN_PIPE
    except SystemExit as exc:  # argparse: 2 on bad usage, 0 after --help
        return _exit_code(exc.code)


def _main(argv: list[str]) -> int:
    word = _first_word(argv)
    commands = _commands(word)
    verb = word if word in dict(commands) else None
    module = _import_verb(verb, dict(commands)[verb]) if verb else None
    parser = _build_parser(commands, verb, module)
    args = parser.parse_args(argv)
    assert module is not None  # parse_args has refused a missing or unknown verb
    return int(module.run(args) or 0)


def _first_word(argv: list[str]) -> str | None:
    """The verb, found before parsing: top-level options take no values, so it is the first word."""
    for word in argv:
        if not word.startswith("-"):
            return word
    return None


def _commands(word: str | None) -> list[tuple[str, str]]:
    """The verbs to offer: the built-in ones, and other packages' unless `word` is a built-in
    verb (a chosen verb's parser never shows the others)."""
    if word in dict(_COMMANDS):
        return list(_COMMANDS)
    return _COMMANDS + plugin_verbs()


def plugin_verbs() -> list[tuple[str, str]]:
    """(verb, module) of other packages' verbs (the entry point group's), by name. A built-in
    verb's name is not taken. `ablate` comes this way, from workloads (pyproject.toml)."""
    builtin = dict(_COMMANDS)
    verbs: dict[str, str] = {}
    for name, module in _entry_point_verbs():
        if name not in builtin:
            verbs.setdefault(name, module)
    return sorted(verbs.items())


def _entry_point_verbs() -> list[tuple[str, str]]:
    from importlib.metadata import entry_points  # lazily: it reads every installed package's metadata

    try:
        return [(ep.name, ep.value.partition(":")[0].strip()) for ep in entry_points(group=PLUGIN_GROUP)]
    except Exception:  # noqa: BLE001 - broken metadata elsewhere must not break the built-in verbs
        return []


def _import_verb(verb: str, module_name: str):
    try:
        return importlib.import_module(module_name)
    except ImportError as exc:  # e.g. pandas missing where only capture was installed
        raise VramscopeError(f"`{PROG} {verb}` is unavailable: {exc}") from exc


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line (and exit code 2), not usage + error."""

    def error(self, message):
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def _build_parser(commands: list[tuple[str, str]], verb: str | None, module) -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="GPU memory profiler for PyTorch.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module_name in commands:
        if name == verb:
            p = sub.add_parser(
                name, help=module.HELP, description=module.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
            )
            module.add_arguments(p)
        else:
            # Never parsed in this process: a help line is all it needs.
            sub.add_parser(name, help=_summary(module_name))
    return parser


def _summary(module_name: str) -> str:
    """First docstring line of a verb module, read without importing it."""
    try:
        origin = _source_of(module_name)
        if not origin:
            return ""
        with open(origin, encoding="utf-8") as f:
            doc = ast.get_docstring(ast.parse(f.read())) or ""
    except (OSError, SyntaxError, ValueError, ImportError):
        return ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def _source_of(module_name: str) -> str | None:
    """The file `module_name` would be imported from, found without importing it or the
    packages above it (importlib.util.find_spec would run their __init__)."""
    spec, path = None, None
    parts = module_name.split(".")
    for depth in range(1, len(parts) + 1):
        name = ".".join(parts[:depth])
        spec = getattr(sys.modules.get(name), "__spec__", None) or _find_spec(name, path)
        if spec is None:
            return None
        path = spec.submodule_search_locations
    return spec.origin if spec is not None and spec.has_location else None


def _find_spec(name: str, path):
    for finder in sys.meta_path:  # the import system's own finders, editable installs' included
        find_spec = getattr(finder, "find_spec", None)
        if find_spec is None:
            continue
        try:
            spec = find_spec(name, path)
        except (ImportError, ValueError):
            continue
        if spec is not None:
            return spec
    return None


def _print_error(message: str) -> None:
    # One line, whatever the message holds: scripts grep for this prefix.
    line = " ".join(message.split())
    print(f"{PROG}: error: {line}", file=sys.stderr)


def _drop_stdout() -> None:
    # Python flushes stdout again at exit, into the closed pipe: point it at /dev/null first.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout replaced by something without a descriptor
        pass


def _exit_code(code) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)  # sys.exit("message") convention
    return 1
