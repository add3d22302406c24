"""SIGTERM and SIGHUP end a capture as Ctrl-C does: the trace is finalized first.

What SLURM, Kubernetes and `timeout` send would otherwise kill the process at once,
leaving a trace that never gets a final status. While a capture runs, these signals
raise `Terminated` in the main thread, which unwinds the script like KeyboardInterrupt;
the capture, left with it, finalizes with status `terminated` and then delivers the
same signal again under its default action, so that the process ends as it would have
without vramscope (killed by SIGTERM: 143 in a shell).

A handler the script installed before the capture runs first, and decides: if it
returns (a "stop after this step" flag), the script goes on as it would have. One it
installs during the capture replaces ours, as it would replace the default. An ignored
signal stays ignored.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Callable

HANDLED = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


class Terminated(BaseException):
    """A SIGTERM or SIGHUP arrived during a capture (BaseException: `except Exception` lets it pass)."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(f"received {signal.Signals(signum).name}")


def install() -> Callable[[], None]:
    """Route SIGTERM and SIGHUP through the capture; returns what puts the handlers back."""
    if threading.current_thread() is not threading.main_thread():
        return _nothing  # signal handlers can only be set from the main thread
    saved = {}  # signum -> (the handler before ours, ours)
    for signum in HANDLED:
        previous = signal.getsignal(signum)
        if previous is signal.SIG_IGN or previous is None:  # ignored, or set outside Python
            continue
        ours = _handler(previous)
        with contextlib.suppress(ValueError, OSError):
            signal.signal(signum, ours)
            saved[signum] = (previous, ours)

    def restore() -> None:
        for signum, (previous, ours) in saved.items():
            if signal.getsignal(signum) is ours:  # one the script set since stays
                with contextlib.suppress(ValueError, OSError):
                    signal.signal(signum, previous)
        saved.clear()

    return restore


def _handler(previous):
    def terminate(signum, frame):
        if callable(previous):  # the script's own handler decides first
            previous(signum, frame)
            return
        raise Terminated(signum)

    return terminate


def redeliver(exc: BaseException | None) -> None:
    """After a capture ended by `Terminated`: the signal again, under its default action."""
    if isinstance(exc, Terminated):
        signal.signal(exc.signum, signal.SIG_DFL)
        os.kill(os.getpid(), exc.signum)


def _nothing() -> None:
    pass
