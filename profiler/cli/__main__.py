"""`python -m profiler.cli`: the same as the `vramscope` command."""

from profiler.cli import main

raise SystemExit(main())
