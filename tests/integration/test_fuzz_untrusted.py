"""500 seeded mutations of a bundled trace and every hostile snapshot pickle: no traceback, no hang,
no number that breaks its invariants, in bounded memory.

The cases run in two child processes (tests/fuzz_untrusted.py), one per core, each under
RLIMIT_AS so that reading something unbounded fails the test instead of the machine; each case
has its own alarm, and a child that stops answering is killed by the timeout here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hostile_pickles import hostile_snapshots

TESTS = Path(__file__).resolve().parents[1]
MUTATIONS = 500
MEMORY_GIB = 3


@pytest.mark.slow
def test_mutated_traces_and_hostile_pickles_fail_cleanly():
    n_pickles = len(hostile_snapshots())
    half = n_pickles // 2
    halves = [(0, MUTATIONS // 2, f"0:{half}"), (MUTATIONS // 2, MUTATIONS // 2, f"{half}:{n_pickles}")]
    children = [
        subprocess.Popen(
            [sys.executable, str(TESTS / "fuzz_untrusted.py"), "--first", str(first), "--count", str(count)]
            + ["--pickles", pickles, "--memory-gib", str(MEMORY_GIB)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for first, count, pickles in halves
    ]
    results = []
    for child in children:
        try:
            out, err = child.communicate(timeout=540)
        except subprocess.TimeoutExpired:
            child.kill()
            pytest.fail("a fuzz process stopped answering (a hang the per-case alarm could not break)")
        assert child.returncode == 0, err[-2000:]
        results.append(json.loads(out))
    assert sum(r["mutations"] for r in results) == MUTATIONS
    assert sum(r["pickles"] for r in results) == n_pickles >= 30
    for kind in ("traceback", "hang", "wrong"):
        found = [x for r in results for x in r[kind]]
        assert not found, f"{len(found)} {kind}(s): " + "\n".join(found[:5])
    exits: dict[str, int] = {}
    for r in results:
        for key, n in r["exits"].items():
            exits[key] = exits.get(key, 0) + n
    # Both outcomes occur: the fuzzing reaches the numbers, not only the parsers.
    assert exits.get("report 0", 0) + exits.get("report 0 warned", 0) >= 50, exits
    assert exits.get("report 2", 0) >= 50, exits
