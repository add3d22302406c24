"""Run a Python script (or -m module) under capture, unmodified.

    vramscope run [options] script.py [args ...]
    vramscope run [options] -m module [args ...]

The script sees what `python script.py args...` (or `python -m module args...`)
would give it: sys.argv, __name__ == "__main__", __file__, and sys.path[0] (the
script's directory, or the current directory for -m). vramscope's options come
before the script or -m; everything after it belongs to the script. Steps are
found from optimizer steps (or the script's own profiler.step() calls).

The exit code is the script's: 0, its sys.exit() code, 1 after an uncaught
exception (with its traceback), 130 after Ctrl-C; SIGTERM and SIGHUP end it as
they would end the script (143 and 129 in a shell), once the trace is finalized.
The trace is finalized in every case, with status complete, error or terminated.
"""

from __future__ import annotations

import argparse
import builtins
import importlib.util
import io
import os
import runpy
import sys
import types
from pathlib import Path

from profiler.errors import UsageError, VramscopeError

NAME = "run"
HELP = __doc__.splitlines()[0]

EXIT_INTERRUPTED = 130  # what a shell reports for SIGINT


def add_arguments(parser) -> None:
    # Everything after the script (or -m MODULE) is the script's, and argparse must not
    # read `--n` as an abbreviation of `--name` there: no abbreviations at all.
    parser.allow_abbrev = False
    parser.usage = "%(prog)s [options] script.py [args ...]\n       %(prog)s [options] -m module [args ...]"
    parser.add_argument("--out", default="traces", help="directory for the run (default: traces)")
    parser.add_argument("--name", help="run name (default: the script's or module's name)")
    parser.add_argument(
        "--backend",
        choices=("auto", "cuda", "cpu"),
        default="auto",
        help="cuda: allocator history; cpu: tensor storages (default: auto)",
    )
    parser.add_argument(
        "--no-stacks", action="store_true", help="do not record Python stacks (cheaper, no Stacks view)"
    )
    parser.add_argument(
        "--hooked-steps",
        type=hooked_steps,
        default=(3, 50),
        metavar="all|FIRST,EVERY",
        help="which steps run module hooks: all, or the first FIRST steps and every EVERY-th "
        "(plus, adaptively, the step after a new kind of step or a new peak); the others take "
        "modules and phases from a hooked step (default: 3,50)",
    )
    parser.add_argument(
        "--config",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="record a toggle in the run's config (repeatable)",
    )
    parser.add_argument(
        "-m",
        dest="module",
        nargs=argparse.REMAINDER,
        metavar="MODULE [ARGS]",
        help="run a module as `python -m MODULE ARGS` does; the rest of the line is its arguments",
    )
    parser.add_argument(
        "target", nargs=argparse.REMAINDER, metavar="script.py [ARGS]", help="the script to run, then its arguments"
    )


def hooked_steps(text: str) -> tuple[int, int] | None:
    """`all` (None: every step hooked) or `FIRST,EVERY`, two ints >= 0."""
    if text.strip() == "all":
        return None
    first, sep, every = text.partition(",")
    try:
        value = (int(first), int(every))
    except ValueError:
        value = None
    if not sep or value is None or min(value) < 0:
        raise argparse.ArgumentTypeError(f"expected all or FIRST,EVERY (two ints >= 0), not {text!r}")
    return value


def _parse_config(items: list[str]) -> dict:
    config = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--config expects KEY=VALUE, got {item!r}")
        config[key] = value
    return config


class _Target:
    """What to run and how: the argv it gets, its sys.path[0], a name for the run."""

    def __init__(self, args):
        if args.module is not None:
            if not args.module:
                raise UsageError("-m needs a module name")
            self.module, self.script = args.module[0], None
            self.argv = list(args.module)  # argv[0] becomes the module's file, as with python -m
            self.path0 = os.getcwd()
            self.name = self.module
            self.command = ["-m"] + self.argv
        else:
            words = list(args.target)
            if words and words[0] == "--":
                words = words[1:]
            if not words:
                raise UsageError("run needs a script (or -m MODULE) to run")
            given = words[0]
            path = Path(given)
            if not path.exists():
                raise UsageError(f"no such script: {given}")
            self.module, self.script = None, given
            self.argv = words  # argv[0] exactly as typed, as with python script.py
            # python puts the script's directory first, symlinks resolved (a directory or
            # zip with a __main__.py is itself put first by runpy).
            self.path0 = str(path.resolve().parent) if path.is_file() else None
            self.name = path.stem if path.is_file() else path.resolve().name
            self.command = list(words)

    def check_module(self) -> None:
        """Fail as a usage error, before capture starts, when the module cannot be found."""
        if self.module.startswith("."):
            raise UsageError(f"cannot run module {self.module!r}: relative module names are not supported")
        # find_spec imports the parent packages, as python -m does before running.
        try:
            spec = importlib.util.find_spec(self.module)
        except ModuleNotFoundError as exc:
            missing = exc.name or ""
            if missing and (self.module + ".").startswith(missing + "."):  # a parent is missing
                raise UsageError(f"no module named {missing}") from None
            return  # the parent package's own import failed: runpy reports it, under capture
        except ValueError as exc:  # an empty or relative name
            raise UsageError(f"cannot run module {self.module!r}: {exc}") from None
        except Exception:  # noqa: BLE001 - as above: the script's error, reported with a traceback
            return
        if spec is None:
            raise UsageError(f"no module named {self.module}")
        if spec.submodule_search_locations is not None:  # a package: python -m runs its __main__
            try:
                main = importlib.util.find_spec(self.module + ".__main__")
            except Exception:  # noqa: BLE001
                return
            if main is None:
                raise UsageError(f"{self.module} is a package and has no __main__ module")

    def run(self) -> None:
        if self.module is not None:
            # Exactly what `python -m` does: imports parents, sets __spec__, argv[0] and __main__.
            runpy.run_module(self.module, run_name="__main__", alter_sys=True)
        elif Path(self.script).is_file():
            _run_file(self.script)
        else:  # a directory or zip archive holding __main__.py
            runpy.run_path(self.script, run_name="__main__")


def _run_file(given: str) -> None:
    """Execute a script file as `python script.py` would, in a fresh __main__ module.

    runpy.run_path would make argv[0] the path it is given; python keeps argv[0]
    as typed and makes __file__ absolute.
    """
    from importlib.machinery import SourceFileLoader

    filename = os.path.abspath(given)
    with io.open_code(filename) as f:
        source = f.read()
    code = compile(source, filename, "exec", dont_inherit=True)  # bytes: PEP 263 cookies apply
    main = types.ModuleType("__main__")
    main.__dict__.update(
        __file__=filename,
        __cached__=None,
        __spec__=None,
        __package__=None,
        __loader__=SourceFileLoader("__main__", filename),
        __builtins__=builtins,
    )
    saved = sys.modules.get("__main__")
    sys.modules["__main__"] = main  # pickle and multiprocessing find the script's classes
    try:
        exec(code, main.__dict__)
    finally:
        if saved is not None:
            sys.modules["__main__"] = saved


def _script_traceback(tb):
    """The traceback from the script's first frame on, as python would print it."""
    own = {__name__, "runpy"}
    while tb is not None and tb.tb_frame.f_globals.get("__name__") in own:
        tb = tb.tb_next
    return tb


def _exit_code(code) -> int:
    """What python exits with after SystemExit(code)."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)  # sys.exit("message"): printed, exit status 1
    return 1


def run(args) -> int:
    config = _parse_config(args.config)
    target = _Target(args)  # bad arguments fail here, before torch is imported

    import torch

    from profiler.capture.session import profile
    from profiler.capture.signals import Terminated

    if args.backend == "cuda" and not torch.cuda.is_available():
        raise UsageError("--backend cuda: no CUDA device is available")

    saved_argv, saved_path = sys.argv, list(sys.path)
    # python puts the script's directory (or, for -m, the current directory) first on
    # sys.path, in place of the launcher's own first entry; -P (safe_path) leaves it be.
    if target.path0 is not None and not sys.flags.safe_path:
        if sys.path:
            sys.path[0] = target.path0
        else:
            sys.path.insert(0, target.path0)
    try:
        if target.module is not None:
            target.check_module()
        prof = profile(
            out=args.out,
            name=args.name or target.name,
            config=config,
            backend=args.backend,
            stacks=not args.no_stacks,
            hooked_steps=args.hooked_steps,
            extra_meta=dict(command=target.command),
        )
        try:
            prof.__enter__()
        except VramscopeError:
            raise
        except Exception as exc:  # an unwritable --out, a backend that cannot start
            raise VramscopeError(f"cannot start the capture: {type(exc).__name__}: {exc}") from exc
        sys.argv = list(target.argv)
        error: BaseException | None = None
        try:
            target.run()
        except BaseException as exc:  # noqa: BLE001 - every outcome is the script's to report
            error = exc
        sys.argv = saved_argv
        if isinstance(error, Terminated):  # the capture re-sends the signal once it has finalized
            print(f"vramscope: {error}: the trace is finalized in {prof.run_dir}", file=sys.stderr, flush=True)
        # Finalizes the trace (status complete, error or terminated) and never raises.
        prof.__exit__(
            type(error) if error is not None else None, error, error.__traceback__ if error is not None else None
        )
    finally:
        sys.argv = saved_argv
        sys.path[:] = saved_path

    code = _outcome(error)
    if prof.run_dir is not None and prof.failure is None:  # a failed capture said where, once
        print(f"vramscope: trace written to {prof.run_dir}", file=sys.stderr)
    return code


def _outcome(error: BaseException | None) -> int:
    """The exit code python would give, after printing what python would print."""
    if error is None:
        return 0
    if isinstance(error, SystemExit):
        return _exit_code(error.code)
    tb = _script_traceback(error.__traceback__)
    sys.excepthook(type(error), error.with_traceback(tb), tb)
    return EXIT_INTERRUPTED if isinstance(error, KeyboardInterrupt) else 1
