"""What vramscope asks of dynamo, without importing it: whether it has compiled, and
which of our frames it must leave alone (standard library only)."""

from __future__ import annotations

import sys

from profiler.capture import import_hooks

errors: list[str] = []  # dynamo refused a frame strategy (meta.json compile_attribution_errors)
_waiting: set[tuple] = set()  # code objects whose strategies wait for dynamo's import


def dynamo_compiled() -> bool:
    """Whether dynamo has compiled any frame in this process (no import of dynamo)."""
    utils = sys.modules.get("torch._dynamo.utils")
    frames = getattr(utils, "counters", {}).get("frames") if utils is not None else None
    return bool(frames and frames.get("total", 0))


def skip_in_dynamo(wrapper, *hooks) -> None:
    """Dynamo runs the frames of code object `wrapper` as they are and compiles the frames
    it calls, and runs the frames of `hooks` and all they call as they are: now, or once
    dynamo is imported (module_calls.py says why). The wrapper goes in at every hooked step:
    until dynamo is imported, one callback per set of code objects waits, not one per step."""
    key = (wrapper, *hooks)
    if import_hooks.DYNAMO_EVAL_FRAME not in sys.modules:
        if key in _waiting:
            return
        _waiting.add(key)

    def set_strategies(eval_frame) -> None:
        try:
            strategy, action = eval_frame.FrameExecStrategy, eval_frame.FrameAction
            eval_frame.set_code_exec_strategy(wrapper, strategy(action.SKIP, action.DEFAULT))
            for code in hooks:
                eval_frame.set_code_exec_strategy(code, strategy(action.SKIP, action.SKIP))
        except Exception as e:  # noqa: BLE001 - a dynamo without per-code strategies compiles the wrapper
            if len(errors) < 20:
                errors.append(f"dynamo skip: {e!r}")

    import_hooks.when_imported(import_hooks.DYNAMO_EVAL_FRAME, set_strategies)
