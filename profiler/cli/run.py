"""Run a Python script (or -m module) under capture, unmodified.

The script sees what `python script.py args...` would give it: sys.argv,
__name__ == "__main__" and its own directory first on sys.path. Steps are
found from optimizer steps (or the script's own prof.step() calls). The
script's exit code and exceptions pass through unchanged.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

from profiler.errors import UsageError

NAME = "run"
HELP = __doc__.splitlines()[0]


def add_arguments(parser) -> None:
    parser.add_argument("--out", default="traces", help="directory for the run (default: traces)")
    parser.add_argument("--name", help="run name (default: the script's name)")
    parser.add_argument("--backend", choices=("auto", "cuda", "cpu"), default="auto",
                        help="cuda: allocator history; cpu: tensor storages (default: auto)")
    parser.add_argument("--no-stacks", action="store_true",
                        help="do not record Python stacks (cheaper, no Stacks view)")
    parser.add_argument("--config", action="append", default=[], metavar="KEY=VALUE",
                        help="record a toggle in the run's config (repeatable)")
    parser.add_argument("-m", dest="module", metavar="MODULE",
                        help="run a module as `python -m MODULE` does")
    parser.add_argument("script", nargs="?", help="the script to run")
    parser.add_argument("args", nargs="...", help="arguments passed to the script")


def _parse_config(items: list[str]) -> dict:
    config = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--config expects KEY=VALUE, got {item!r}")
        config[key] = value
    return config


def run(args) -> int:
    from profiler.capture.session import profile

    config = _parse_config(args.config)
    if args.module:
        target, argv = args.module, [args.module] + ([args.script] if args.script else []) + args.args
        name = args.name or args.module
    else:
        if not args.script:
            raise UsageError("run needs a script (or -m MODULE)")
        script = Path(args.script)
        if not script.is_file():
            raise UsageError(f"no such script: {args.script}")
        target, argv = str(script), [str(script)] + args.args
        name = args.name or script.stem
    prof = profile(out=args.out, name=name, config=config, backend=args.backend,
                   stacks=not args.no_stacks)
    old_argv, old_path0 = sys.argv, sys.path[0] if sys.path else None
    sys.argv = argv
    if not args.module:
        sys.path.insert(0, str(Path(target).resolve().parent))
    code = 0
    try:
        with prof:
            if args.module:
                runpy.run_module(target, run_name="__main__", alter_sys=True)
            else:
                runpy.run_path(target, run_name="__main__")
    except SystemExit as e:
        code = e.code
        raise
    finally:
        sys.argv = old_argv
        if not args.module and sys.path and old_path0 is not None:
            sys.path.remove(str(Path(target).resolve().parent))
        if prof.run_dir is not None:
            print(f"vramscope: trace written to {prof.run_dir}", file=sys.stderr)
    return code if isinstance(code, int) else 1

