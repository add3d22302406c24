"""bench/step_costs.py clocks each step end's parts once a step, in a loop shaped as
overhead.py's decode rows."""

from __future__ import annotations

import importlib

import torch

from bench import step_costs


def test_each_step_and_its_parts_are_clocked_once(monkeypatch):
    from profiler.capture import session

    # The clocks patch these classes and the session's backend maker: put them back after the test.
    for module, cls_name, attr, _ in step_costs.SHARED_PARTS:
        cls = getattr(importlib.import_module(module), cls_name)
        monkeypatch.setattr(cls, attr, cls.__dict__[attr])
    monkeypatch.setattr(session, "make_backend", session.make_backend)
    monkeypatch.setattr(step_costs, "_installed", [])
    monkeypatch.setattr(step_costs, "SECONDS", step_costs.collections.defaultdict(list))
    tokens, rounds, threads = 5, 2, torch.get_num_threads()
    try:
        got = step_costs.measure("concat", tokens, rounds)
    finally:
        torch.set_num_threads(threads)  # measure() pins one thread on the CPU
    steps = rounds * (tokens + 1)  # the prefill's step and each token's
    assert got["steps"] == steps
    parts = got["parts"]
    for name in (step_costs.RECORD_KV, step_costs.STEP, "pacing", "hook sampling", "steps row"):
        assert parts[name]["calls_a_step"] == 1, name
    # a marker a step end, and one a capture at the model's first forward (its parameters' position)
    assert parts["position marker"]["calls_a_step"] * steps == steps + rounds
    assert 0 < parts["drain"]["calls_a_step"] <= 1  # the first step end drains; a capture's end too
    assert got["plain_token_ms"]["median"] > 0 and got["captured_token_ms"]["median"] > 0


def test_bad_arguments_exit_2(capsys):
    assert step_costs.main(["--tokens", "1"]) == 2
    assert "--tokens" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert step_costs.main(["--device", "cuda"]) == 2
        assert "no CUDA device" in capsys.readouterr().err
