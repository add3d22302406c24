"""CaptureOptions: every option of a capture once, checked when a Profiler is made."""

from __future__ import annotations

import dataclasses
import inspect

import pytest

from profiler.capture.options import CaptureOptionError, CaptureOptions, option_names
from profiler.capture.session import Profiler, profile
from profiler.errors import UsageError


def test_profile_defaults_are_the_options_defaults():
    defaults = {
        f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
        for f in dataclasses.fields(CaptureOptions)
    }
    params = inspect.signature(profile).parameters
    explicit = {n: p.default for n, p in params.items() if p.kind is not p.VAR_KEYWORD}
    assert set(explicit) <= set(defaults)
    for name, default in explicit.items():
        assert defaults[name] == default or (default is None and name == "config"), name
    assert profile().options == CaptureOptions()


def test_profile_and_profiler_build_the_same_options(tmp_path):
    kw = dict(
        backend="cpu",
        stacks=False,
        modules=False,
        hooked_steps=None,
        max_entries=10,
        drain_interval_s=0,
        run_id="r",
        subdir="s",
        extra_meta={"a": 1},
        explicit_steps=True,
    )
    a = profile(tmp_path, "n", {"x": 1}, **kw).options
    b = Profiler(tmp_path, "n", {"x": 1}, **kw).options
    assert a == b == CaptureOptions(out=tmp_path, name="n", config={"x": 1}, **kw)
    assert Profiler.from_options(a).options == a
    assert CaptureOptions(**a.as_kwargs()) == a


def test_options_are_frozen_and_own_their_dicts():
    config = {"lr": 1}
    opts = CaptureOptions(config=config)
    config["lr"] = 2
    assert opts.config == {"lr": 1} and opts.name == "run"
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.stacks = False
    with pytest.raises(TypeError):
        CaptureOptions("traces")  # keyword only


@pytest.mark.parametrize(
    "kw, words",
    [
        (dict(backend="gpu"), "unknown backend 'gpu'"),
        (dict(hooked_steps=(3,)), "hooked_steps"),
        (dict(hooked_steps=(3, -1)), "hooked_steps"),
        (dict(hooked_steps="3,50"), "hooked_steps"),
        (dict(hooked_steps=(True, 5)), "hooked_steps"),
        (dict(max_entries=0), "max_entries"),
        (dict(max_entries=2.5), "max_entries"),
        (dict(drain_interval_s=-1), "drain_interval_s"),
        (dict(drain_interval_s="1"), "drain_interval_s"),
        (dict(config=3), "config"),
    ],
)
def test_bad_options_fail_when_the_profiler_is_made(kw, words):
    with pytest.raises(CaptureOptionError, match=words) as info:
        profile(**kw)
    assert isinstance(info.value, UsageError) and isinstance(info.value, ValueError)
    assert "\n" not in str(info.value)


def test_unknown_option_is_a_type_error():
    with pytest.raises(TypeError, match="stackz"):
        profile(stackz=False)
    with pytest.raises(TypeError, match="stackz"):
        Profiler(stackz=False)


def test_hooked_steps_are_normalised_and_choose_steps():
    assert CaptureOptions(hooked_steps=[2, 10]).hooked_steps == (2, 10)
    opts = CaptureOptions(hooked_steps=(2, 10))
    assert [s for s in range(25) if opts.hooks_step(s)] == [0, 1, 10, 20]
    assert all(CaptureOptions(hooked_steps=None).hooks_step(s) for s in range(5))
    assert [s for s in range(5) if CaptureOptions(hooked_steps=(2, 0)).hooks_step(s)] == [0, 1]


def test_integrations_accept_exactly_the_options():
    from profiler.integrations import _check_profile_kwargs

    _check_profile_kwargs({n: None for n in option_names()})
    with pytest.raises(TypeError, match="stackz"):
        _check_profile_kwargs({"stackz": False})
