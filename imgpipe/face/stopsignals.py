"""SIGTERM and SIGINT as a clean stop of whatever this process started.

``imgpipe up`` and ``imgpipe run`` own a ``Stack`` of child processes in their own
sessions: a default SIGTERM would end this process at once and leave every child
running. Inside ``stop_on_signals()`` the first SIGTERM or SIGINT raises ``StopRequested``
in the main thread instead (like ``KeyboardInterrupt``), so ``with Stack(...)`` blocks
unwind and stop their children in order; later signals are logged and ignored while that
stop runs. ``signals_deferred()`` holds a signal back until a short critical section (a
child started but not yet recorded) is over.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator
from types import FrameType

__all__ = ["STOP_SIGNALS", "StopRequested", "signals_deferred", "stop_on_signals", "stopping"]

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequested(BaseException):
    """A stop signal arrived; unwinding stops what this process started.

    A BaseException, like KeyboardInterrupt, so that ``except Exception`` blocks on the
    way out do not swallow it."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(f"stopped by {signal.Signals(signum).name}")

    @property
    def exit_code(self) -> int:
        """The shell's convention for a process ended by a signal: 128 + its number."""
        return 128 + self.signum


class _State:
    def __init__(self) -> None:
        self.installed = False
        self.raised = False
        self.deferring = 0
        self.pending: int | None = None


_state = _State()


def _handler(signum: int, _frame: FrameType | None) -> None:
    name = signal.Signals(signum).name
    if _state.raised:
        log.warning("%s: already stopping; waiting for the processes to exit", name)
        return
    if _state.deferring:
        _state.pending = _state.pending or signum
        return
    _state.raised = True
    raise StopRequested(signum)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Turn the first SIGTERM/SIGINT into ``StopRequested`` (main thread only; elsewhere
    this does nothing, as Python delivers signals to the main thread alone)."""
    if threading.current_thread() is not threading.main_thread() or _state.installed:
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    _state.installed, _state.raised, _state.pending = True, False, None
    for sig in STOP_SIGNALS:
        signal.signal(sig, _handler)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _state.installed = False


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold a stop signal that arrives inside this block; raise it when the block ends."""
    _state.deferring += 1
    try:
        yield
    finally:
        _state.deferring -= 1
    if not _state.deferring and _state.pending is not None and not _state.raised:
        signum, _state.pending = _state.pending, None
        _state.raised = True
        raise StopRequested(signum)


def stopping() -> bool:
    """True once a stop signal was turned into ``StopRequested``."""
    return _state.raised
