"""The tracker's timed build (VRAMSCOPE_TIME_PARTS, for bench/tracker_costs.py): its part
clocks count exactly what the tracker did, and the default build has none."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from profiler.capture import native

REPO = Path(__file__).resolve().parents[2]
ALLOC, FREE_REQUESTED, FREE_COMPLETED = 0, 1, 2

CHILD = textwrap.dedent(
    f"""
    import json
    from profiler.capture import native
    t, error = native.load(cuda=False)
    assert t is not None, error
    t.start(0, True, 64)
    t.part_times()  # from zero
    for addr in range(1, 6):  # five walks from one line: each after the first is the one before
        t.record_for_test({ALLOC}, 0, addr, 512, 7)
    for addr in range(1, 6):
        t.record_for_test({FREE_REQUESTED}, 0, addr, 512, 7)
        t.record_for_test({FREE_COMPLETED}, 0, addr, 512, 7)
    t.record_for_test({ALLOC}, 1, 99, 512, 7)  # another device: no event
    parts = t.part_times()
    again = t.part_times()
    events = len(t.drain()["action"])
    print(json.dumps(dict(parts, events=events, reads_frames=t.reads_frames, again=again["event_calls"])))
    """
)


def test_the_timed_build_counts_each_event_walk_and_free_it_handled():
    plain, error = native.load(cuda=False)
    if plain is None:
        pytest.skip(f"the tracker does not build here: {error}")
    assert not hasattr(plain, "part_times")  # the default build carries no clocks
    env = dict(os.environ, VRAMSCOPE_TIME_PARTS="1")
    done = subprocess.run([sys.executable, "-c", CHILD], env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["event_calls"] == got["events"] == 15
    assert got["free_calls"] == 10
    assert got["again"] == 0  # read and zeroed
    assert got["event_ns"] >= got["stack_ns"] + got["free_ns"] > 0
    assert got["clock_read_ns"] > 0
    if got["reads_frames"]:
        assert got["stack_calls"] == 5 and got["walks_reused"] == 4
        assert got["frames_read"] == 5 * got["frames_looked_up"] > 0


@pytest.mark.parametrize("args", [["--rounds", "1"], ["--tokens", "x"], ["--rows", "train"]])
def test_the_bench_refuses_bad_arguments_in_one_line(args):
    done = subprocess.run(
        [sys.executable, "bench/tracker_costs.py", *args], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].strip()
