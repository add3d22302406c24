"""Both backends implement the Backend protocol, and the session depends on nothing else."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pytest

from profiler.capture.backend import Backend, make_backend
from profiler.capture.cpu import CpuBackend
from profiler.capture.cuda import CudaBackend
from profiler.capture.native_cpu import NativeCpuBackend

CAPTURE = Path(__file__).resolve().parents[2] / "profiler" / "capture"


def _protocol_members() -> set[str]:
    own = set(vars(Backend)) | set(Backend.__annotations__)
    return {m for m in own if not m.startswith("_")}


def _defined_by(cls) -> set[str]:
    """Attributes of the class, and those its methods assign on self."""
    assigned = set(re.findall(r"\bself\.([a-z]\w*)(?:\s*:[^=\n]+)?\s*=(?!=)", inspect.getsource(cls)))
    return {m for m in dir(cls) if not m.startswith("_")} | assigned


def test_cpu_backend_is_a_backend():
    backend = CpuBackend(stacks=False)
    assert isinstance(backend, Backend)
    assert backend.position(0) == backend.events_seen == 0
    backend.install_oom_observer(lambda *a: None)
    backend.remove_oom_observer()


@pytest.mark.parametrize("cls", [CpuBackend, CudaBackend, NativeCpuBackend])
def test_every_protocol_member_is_defined(cls):
    missing = _protocol_members() - _defined_by(cls)
    assert not missing, f"{cls.__name__} lacks {sorted(missing)}"


def test_backends_differ_only_in_what_their_members_say():
    assert (CudaBackend.name, CudaBackend.device_type) == ("cuda", "cuda")
    cpu = CpuBackend(stacks=False)
    assert (cpu.name, cpu.device_type) == ("cpu", "cpu")
    assert not CudaBackend.positions_need_drain and CpuBackend.positions_need_drain
    assert (NativeCpuBackend.name, NativeCpuBackend.positions_need_drain) == ("cpu", True)


def test_make_backend():
    from profiler.capture import native

    tracker, _ = native.load(cuda=False)
    default = make_backend("cpu", stacks=False, max_entries=1)
    assert isinstance(default, NativeCpuBackend if tracker is not None else CpuBackend)
    assert isinstance(make_backend("cpu", stacks=False, max_entries=1, capture_path="python"), CpuBackend)
    with pytest.raises(ValueError, match="unknown backend"):
        make_backend("tpu", stacks=False, max_entries=1)


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


def test_session_asks_no_backend_its_name_and_fsdp_never_imports_the_session():
    session_py = (CAPTURE / "session.py").read_text()
    assert "backend.name ==" not in session_py and "backend.name !=" not in session_py
    assert "profiler.capture.session" not in _imports(CAPTURE / "fsdp.py")


class _RecordingCpuBackend(CpuBackend):
    """CPU tracking that records what the session asks of it."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.calls = []

    @property
    def drains(self) -> list[int]:
        return [call[1] for call in self.calls if call[0] == "drain"]

    def drain(self, step, with_segments=False):
        self.calls.append(("drain", step, with_segments))
        return super().drain(step, with_segments)


class _MarkerLikeBackend(_RecordingCpuBackend):
    """CPU tracking that answers like the CUDA backend: positions without draining,
    drains on the timer only."""

    positions_need_drain = False

    def position(self, step):
        self.calls.append(("position", step))
        return -len(self.calls)


def test_a_backend_that_marks_positions_drains_after_its_first_step_on_the_timer_and_at_the_end(tmp_path, monkeypatch):
    import torch

    from profiler.capture import session

    backend = _MarkerLikeBackend(stacks=False)
    monkeypatch.setattr(session, "make_backend", lambda *a, **k: backend)
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with session.profile(out=tmp_path, backend="cpu", drain_interval_s=3600) as prof:
        for _ in range(3):
            model(torch.randn(2, 4)).sum().backward()
            opt.step()
    assert prof.step_index == 3
    # The root's parameters at step 0, then each step end marks the step it starts; the first
    # step end drains (its new stacks), then nothing is due until the end.
    assert backend.calls == [
        ("position", 0),
        ("position", 1),
        ("drain", 1, False),
        ("position", 2),
        ("position", 3),
        ("drain", 3, True),
    ]


def test_a_cpu_step_end_drains_its_backend_once_and_writes_its_step_row(tmp_path, monkeypatch):
    """Positions counted by drained events: the step end drains before the index moves, and
    after it only the rows (the step's own row among them) go to the journals."""
    import torch

    from profiler.capture import session
    from profiler.trace.reader import load_trace

    backend = _RecordingCpuBackend(stacks=False)
    monkeypatch.setattr(session, "make_backend", lambda *a, **k: backend)
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with session.profile(out=tmp_path, backend="cpu", drain_interval_s=3600) as prof:
        for _ in range(3):
            model(torch.randn(2, 4)).sum().backward()
            before = len(backend.drains)
            opt.step()
            assert backend.drains[before:] == [prof.step_index - 1]  # one drain, of the step that ended
    trace = load_trace(prof.run_dir)
    assert list(trace.steps["step"]) == [0, 1, 2]
    assert sorted(set(trace.events["step"])) == [0, 1, 2]


def test_a_due_drain_runs_as_the_optimizer_starts_where_markers_give_steps(tmp_path, monkeypatch):
    import torch

    from profiler.capture import session

    backend = _MarkerLikeBackend(stacks=False)
    monkeypatch.setattr(session, "make_backend", lambda *a, **k: backend)
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with session.profile(out=tmp_path, backend="cpu", drain_interval_s=0) as prof:
        for _ in range(2):
            model(torch.randn(2, 4)).sum().backward()
            backend.calls.append(("optimizer",))
            opt.step()
    assert prof.step_index == 2
    # Due at every chance (forward's end and the step's end drain too): the optimizer's start drains.
    calls = backend.calls
    after_optimizer = [calls[i + 1] for i, c in enumerate(calls) if c == ("optimizer",)]
    assert after_optimizer == [("drain", 0, False), ("drain", 1, False)]
    assert [c for c in calls if c[0] == "position"] == [("position", 0), ("position", 1), ("position", 2)]


def test_drain_pacing_keeps_each_drain_under_a_share_of_a_step():
    """A decode loop's tokens are short and make many events: drained on the timer alone,
    one token would drain half a second of them. Paced, a drain covers as many steps as
    cost SHARE of a usual step to drain, judged from the drains before; the first of
    those is a probe, PROBE_STEPS step ends after the first drain."""
    from profiler.capture.feed import DrainPacing

    clock = [0.0]
    pacing = DrainPacing(clock=lambda: clock[0])
    clock[0] += 0.020
    pacing.step_ended()
    assert pacing.due()  # the first step's new stacks
    pacing.drained(0.050)  # naming them: no measure of later drains, nor a wait after it
    clock[0] += 0.020
    pacing.step_ended()
    assert not pacing.due()
    clock[0] += 0.020
    pacing.step_ended()
    assert pacing.due() and pacing.steps == 2  # the probe: 2 steps for 2.4 ms, 1.2 ms a step
    pacing.drained(0.0024)
    clock[0] += 0.0024
    ends = []
    for i in range(80):
        clock[0] += 0.020
        pacing.step_ended()
        if pacing.due():
            ends.append(i)
            covered = pacing.steps
            pacing.drained(covered * 0.0012)
            clock[0] += covered * 0.0012  # the drain is in the next step's time, which is not counted
    # 0.5 x 20 ms of drain at 1.2 ms a step: every 9th step drains, 10.8 ms each; the first
    # two cover 4 and 8 steps, twice the largest drain before (a fit is trusted no further).
    assert ends == [3, 11, 20, 29, 38, 47, 56, 65, 74]


def test_drain_pacing_lets_a_fixed_cost_be_paid_by_more_steps():
    """A drain that costs 1.2 ms however few events it takes, and 0.03 ms a 5.5 ms step
    besides (a decode loop on the CPU machine): read as all per step, the probe makes every
    few steps drain at 1.3-1.5 ms each. Fitted as fixed + per step, drains grow until they
    cost SHARE of a step: (0.5 x 5.5 - 1.2) / 0.03 = 51 steps, 2.75 ms each."""
    from profiler.capture.feed import DrainPacing

    clock = [0.0]
    pacing = DrainPacing(clock=lambda: clock[0])
    covered = []
    for _ in range(600):
        clock[0] += 0.0055
        pacing.step_ended()
        if pacing.due():
            covered.append(pacing.steps)
            pacing.drained(0.0012 + 0.00003 * pacing.steps)
    assert covered[:4] == [1, 4, 8, 16]  # the first step, the probe (MIN_GAP_S after), then twice the largest
    assert set(covered[-5:]) == {52}  # 0.0012 + 52 x 0.00003 = 2.76 ms: just past 2.75
    assert max(0.0012 + 0.00003 * k for k in covered) < 0.5 * 0.0055 + 0.00003


def test_drain_pacing_tells_a_fixed_part_from_per_step_when_one_size_would_repeat():
    """A drain of 1.5 ms + 0.018 ms a step in a loop of 3.4 ms steps. After the probe, read as
    all per step, the budget allowed 7 steps, which cost as much: every drain stayed at 7 steps,
    and drains of one size never tell the parts apart (233 us a step). While no fit is made,
    each drain covers 1.5 times the largest before, until sizes apart give one: then FLOOR of a
    step beyond the fixed part, (0.1 x 3.4) / 0.018 = 19 steps (97 us a step)."""
    from profiler.capture.feed import DrainPacing

    clock = [0.0]
    pacing = DrainPacing(clock=lambda: clock[0])
    covered = []
    for _ in range(400):
        clock[0] += 0.0034
        pacing.step_ended()
        if pacing.due():
            covered.append(pacing.steps)
            cost = 0.0015 + 0.000018 * pacing.steps
            pacing.drained(cost)
            clock[0] += cost
    assert covered[:4] == [1, 6, 9, 18]  # the first step, the probe (MIN_GAP_S after), 1.5x, then the fit
    assert set(covered[4:]) == {19}


def test_drain_pacing_is_not_thrown_by_a_slow_drain():
    """Drains of 0.85 ms + 0.03 ms a step, where every fifth takes 4 ms more (a collection, a
    busy disk): such a drain once bent a least-squares fit below zero, which read all of the cost
    as per step and drained every few steps. The median slope keeps drains at their size:
    (0.5 x 6.5 - 0.85) / 0.03 = 80 steps."""
    from profiler.capture.feed import DrainPacing

    clock = [0.0]
    pacing = DrainPacing(clock=lambda: clock[0])
    covered = []
    for _ in range(3000):
        clock[0] += 0.0065
        pacing.step_ended()
        if pacing.due():
            covered.append(pacing.steps)
            slow = 0.004 if len(covered) % 5 == 0 else 0.0
            pacing.drained(0.00085 + 0.00003 * pacing.steps + slow)
    assert covered[:5] == [1, 4, 8, 16, 32]  # the first step, the probe (MIN_GAP_S after), twice the largest
    assert min(covered[7:]) == 80 and max(covered[7:]) == 81, covered  # 0.85 + 81 x 0.03 = 3.28 ms


def test_drain_pacing_fit_reads_the_median_slope():
    from profiler.capture.feed import _fit

    fixed, per_step = _fit([(2, 0.0010), (4, 0.0011), (8, 0.0013), (16, 0.0017), (12, 0.0090)])
    assert abs(per_step - 0.00005) < 1e-9 and abs(fixed - 0.0009) < 1e-9  # the 9 ms drain moves neither
    assert _fit([(4, 0.002), (8, 0.001)]) == (0.0015, 0.0)  # no slope below zero: the cost is fixed
    assert _fit([(80, 0.003), (81, 0.007)]) is None  # sizes too alike: a slope of 4 ms a step is noise


def test_drain_pacing_adds_little_to_a_fixed_cost_that_takes_most_of_the_share():
    """A host where a drain's fixed part alone (4 ms) takes most of SHARE of a 5.5 ms step:
    drains wait only until their steps cost FLOOR of a step, so none costs much more than
    the fixed part it cannot avoid."""
    from profiler.capture.feed import DrainPacing

    clock = [0.0]
    pacing = DrainPacing(clock=lambda: clock[0])
    costs = []
    for _ in range(600):
        clock[0] += 0.0055
        pacing.step_ended()
        if pacing.due():
            costs.append(0.004 + 0.00003 * pacing.steps)
            pacing.drained(costs[-1])
    assert max(costs[2:]) <= 0.004 + DrainPacing.FLOOR * 0.0055 + 0.00003
    assert len(costs) < 600 / 15  # not every few steps: each drain covers FLOOR's worth (19 steps)


def test_drain_pacing_drains_short_steps_no_more_often_than_its_gap():
    from profiler.capture.feed import DrainPacing

    clock = [0.0]
    pacing = DrainPacing(clock=lambda: clock[0])
    pacing.step_ended()
    pacing.drained(0.0001)
    for _ in range(3):  # 1 ms steps whose events cost 0.05 ms a step to drain
        clock[0] += 0.001
        pacing.step_ended()
    pacing.drained(0.00015)
    ends = []
    for i in range(100):
        clock[0] += 0.001
        pacing.step_ended()
        if pacing.due():
            ends.append(i)
            pacing.drained(pacing.steps * 0.00005)
    assert ends[:3] == [19, 39, 59]  # every MIN_GAP_S, not every 15 steps


def test_drain_pacing_waits_for_what_it_needs_to_know():
    from profiler.capture.feed import DrainPacing

    pacing = DrainPacing(clock=iter(range(100)).__next__)
    pacing.step_ended()
    assert pacing.due()  # the first step end
    pacing.drained(0.5)  # which teaches nothing
    pacing.step_ended()
    assert not pacing.due()  # no drain measured yet, and one step: too few to probe
    pacing.step_ended()
    assert pacing.due()  # the probe


def test_drain_pacing_leaves_a_drain_of_fixed_cost_to_the_timer():
    """torch's history (the python path) snapshots every live block at each drain: a drain
    costs about the same however few steps it covers. Pacing must not drain every step:
    after the probe, the timer drains."""
    from profiler.capture.feed import DrainPacing

    clock = [0.0]
    pacing = DrainPacing(clock=lambda: clock[0])
    pacing.step_ended()
    pacing.drained(0.100)
    paced = 0
    for i in range(200):  # 30 ms steps, 100 ms a drain; the timer drains every 0.5 s
        clock[0] += 0.030
        pacing.step_ended()
        if pacing.due() or i % 17 == 16:
            paced += pacing.due()
            pacing.drained(0.100)
            clock[0] += 0.100
    assert paced == 1  # the probe


def test_a_paced_drain_moves_events_and_leaves_rows_and_the_journals_to_the_timer(tmp_path, monkeypatch):
    """A paced drain converts events only: the few rows a step buffers cost a conversion a
    table, so they go with the timer's drain, which flushes. Nothing reaches disk in between,
    and every step's row and every event reach the trace."""
    import torch

    from profiler.capture import feed, session
    from profiler.trace.reader import load_trace
    from profiler.trace.writer import TraceWriter

    backend = _MarkerLikeBackend(stacks=False)
    monkeypatch.setattr(session, "make_backend", lambda *a, **k: backend)
    monkeypatch.setattr(feed.DrainPacing, "step_ended", lambda self: True)  # every step end drains
    writes = []
    for name in ("append_rows", "flush"):
        original = getattr(TraceWriter, name)

        def recorded(self, *args, _original=original, _name=name, **kwargs):
            writes.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(TraceWriter, name, recorded)
    model = torch.nn.Linear(4, 4)
    with session.profile(out=tmp_path, backend="cpu", drain_interval_s=3600) as prof:
        started = len(writes)
        for _ in range(4):
            model(torch.randn(2, 4))
            prof.step()
        during = writes[started:]
        prof._parts.feed.last_full_drain = -float("inf")  # the timer is due at the next step end
        model(torch.randn(2, 4))
        prof.step()
        timed = writes[started + len(during) :]
    assert backend.drains == [1, 2, 3, 4, 5, 5]  # each step end, then the end's
    assert during == []
    assert "append_rows" in timed and timed[-1] == "flush"
    trace = load_trace(prof.run_dir)
    assert list(trace.steps["step"]) == [0, 1, 2, 3, 4, 5]
    assert len(trace.events) == backend.events_seen
