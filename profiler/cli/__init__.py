"""The `vramscope` command line: one module per verb, registered in `_COMMANDS`.

Each verb module under profiler/cli/ exposes NAME, HELP (the first line of its
docstring), add_arguments(parser) and run(args) -> int. Only the verb being run
is imported, so that `vramscope run` keeps pandas and the analysis code out of
the profiled process; the other verbs' help lines are read from their source.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import sys

from profiler.errors import UsageError, VramscopeError

PROG = "vramscope"

# (verb, module). The order is the order `vramscope --help` lists them in.
_COMMANDS: list[tuple[str, str]] = [
    ("run", "profiler.cli.run"),
    ("report", "profiler.cli.report"),
    ("info", "profiler.cli.info"),
    ("ablate", "profiler.cli.ablate"),
    ("dashboard", "profiler.cli.dashboard"),
    ("import", "profiler.cli.import_"),
    ("export", "profiler.cli.export"),
    ("estimate", "profiler.cli.estimate"),
    ("whatif", "profiler.cli.whatif"),
]

EXIT_INTERRUPTED = 130  # what a shell reports for SIGINT


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    try:
        return _main(argv)
    except VramscopeError as exc:
        _print_error(str(exc))
        return exc.exit_code
    except KeyboardInterrupt:
        print(file=sys.stderr)  # end the line a ^C left half-written
        return EXIT_INTERRUPTED
    except SystemExit as exc:  # argparse: 2 on bad usage, 0 after --help
        return _exit_code(exc.code)


def _main(argv: list[str]) -> int:
    verb = _chosen_verb(argv)
    module = _import_verb(verb) if verb else None
    parser = _build_parser(verb, module)
    args = parser.parse_args(argv)
    return int(module.run(args) or 0)


def _chosen_verb(argv: list[str]) -> str | None:
    """The verb, found before parsing: top-level options take no values, so it is the first word."""
    known = {name for name, _ in _COMMANDS}
    for word in argv:
        if not word.startswith("-"):
            return word if word in known else None
    return None


def _import_verb(verb: str):
    module_name = dict(_COMMANDS)[verb]
    try:
        return importlib.import_module(module_name)
    except ImportError as exc:  # e.g. pandas missing where only capture was installed
        raise VramscopeError(f"`{PROG} {verb}` is unavailable: {exc}") from exc


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line (and exit code 2), not usage + error."""

    def error(self, message):
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def _build_parser(verb: str | None, module) -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG, description="GPU memory profiler for PyTorch.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module_name in _COMMANDS:
        if name == verb:
            p = sub.add_parser(name, help=module.HELP, description=module.__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
            module.add_arguments(p)
        else:
            # Never parsed in this process: a help line is all it needs.
            sub.add_parser(name, help=_summary(module_name))
    return parser


def _summary(module_name: str) -> str:
    """First docstring line of a verb module, read without importing it."""
    try:
        spec = importlib.util.find_spec(module_name)
        if spec is None or not spec.origin:
            return ""
        with open(spec.origin, encoding="utf-8") as f:
            doc = ast.get_docstring(ast.parse(f.read())) or ""
    except (OSError, SyntaxError, ValueError, ImportError):
        return ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def _print_error(message: str) -> None:
    # One line, whatever the message holds: scripts grep for this prefix.
    line = " ".join(message.split())
    print(f"{PROG}: error: {line}", file=sys.stderr)


def _exit_code(code) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)  # sys.exit("message") convention
    return 1
