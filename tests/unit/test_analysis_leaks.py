"""leaks(): groups alive at step ends told apart by how they grow, over a hand-built run.

Five steps of 10 events each. Optimizer state (4,096 B) is made in step 0 and kept; a cache
fills in steps 1 and 2 (1,024 B each) and then stops; one tensor of 512 B is kept every step
from step 1 on (the leak); a temporary is made and freed in every step.
"""

from __future__ import annotations

from analysis_runs import load
from fakes import write_trace

from profiler.analysis.leaks import FILLED, LEAK, STEADY, leaks


def _events():
    ev = [("alloc", 0x10000, 4096, "optimizer", "opt", "optimizer_state")]
    for step in range(5):
        base = 0x100000 * (step + 1)
        ev += [("alloc", base, 256, "forward", "tmp"), ("free_requested", base, 256, "forward", "tmp")]
        ev += [("free_completed", base, 256, "forward", "tmp")]
        if step in (1, 2):
            ev.append(("alloc", base + 0x1000, 1024, "forward", "cache"))
        if step >= 1:
            ev.append(("alloc", base + 0x2000, 512, "forward", "history"))
    return ev


def test_a_leak_is_told_apart_from_a_filled_cache_and_optimizer_state(tmp_path):
    events = _events()
    # Each step begins at its temporary's alloc.
    starts = [i for i, e in enumerate(events) if e[4] == "tmp" and e[0] == "alloc"]
    steps_of = [max(0, sum(i >= s for s in starts) - 1) for i in range(len(events))]
    run = load(write_trace(tmp_path, events, step_of=lambda i: steps_of[i], modules=[]))
    g = leaks(run)
    assert g.steps == [0, 1, 2, 3, 4]
    kinds = dict(zip(g.table["module"], g.table["kind"]))
    assert kinds == {"history": LEAK, "cache": FILLED, "opt": STEADY}
    leak = g.suspects.iloc[0]
    assert (leak["first_step"], leak["bytes_per_step"], leak["exact_per_step"]) == (1, 512, True)
    assert (leak["first_bytes"], leak["last_bytes"], leak["growth_bytes"]) == (512, 2048, 1536)
    assert g.allocated_at_step_end == [4096, 4096 + 1024 + 512, 4096 + 2048 + 1024, 4096 + 2048 + 1536, 6144 + 2048]
    assert "1 allocation site(s) keep growing over 5 step ends, 512 B per step" in g.verdict


def test_too_few_steps_are_said_so(tmp_path):
    run = load(write_trace(tmp_path, _events()[:4]))
    g = leaks(run)
    assert g.suspects.empty and g.verdict.startswith("Too few completed steps (1)")
