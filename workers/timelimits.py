"""Stage time limits inside a batching consumer: a soft limit that raises, a hard one that exits.

A stage row carries ``time_limit_s`` (``IMGPIPE_STAGE_TIME_LIMITS_S`` per kind). While a
group of rows computes (one forward pass for the group), the consumer arms

- the **soft limit** (``time_limit_s``): ``SIGALRM`` raises ``StageTimeLimitExceeded``
  inside the stage code as soon as the interpreter runs again — Python loops, sleeps and
  I/O are interrupted at once; a call stuck in native code (a forward pass that never
  returns) is not. The error is transient: the rows go back to ``dispatched`` with
  backoff, and after ``max_attempts`` they are ``dead`` with this error.
- the **hard limit** (``hard_limit_s``: the soft limit + the smaller of itself and
  ``HARD_LIMIT_GRACE_S``, so 1 s -> 2 s, 300 s -> 310 s): the consumer's watchdog
  thread exits the process (code 70) when the compute is still running then; the
  supervisor starts a new consumer and the reaper re-runs the rows once their deadline
  (hard limit + ``IMGPIPE_DISPATCH_GRACE_S`` from the claim) has passed — never while
  the attempt that holds them may still be running.

Only the main thread can take a signal; elsewhere the soft limit is not armed (logged),
and the hard limit still applies.

Loading a model (``time_limits_paused``, workers/models/base.py) is not stage work: both
limits pause while it runs and resume with what was left. An interrupt inside an import or
a weights load would leave the process half-initialised for every later batch (a torch
module missing attributes), and the first batch after a start must not pay the load.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType

from imgpipe.errors import TransientError

__all__ = [
    "HARD_LIMIT_GRACE_S",
    "ComputeClock",
    "StageTimeLimitExceeded",
    "hard_limit_s",
    "on_pause_end",
    "soft_time_limit",
    "time_limits_are_paused",
    "time_limits_paused",
]

log = logging.getLogger(__name__)

HARD_LIMIT_GRACE_S = 10.0
"""The longest gap between the soft and the hard limit (Celery's ``timelimit`` header
carries the same 10 s)."""


def hard_limit_s(soft_limit_s: float) -> float:
    """When the watchdog ends a stage that its soft limit could not stop."""
    return soft_limit_s + min(soft_limit_s, HARD_LIMIT_GRACE_S)


class StageTimeLimitExceeded(TransientError):
    """The stage ran past its soft time limit; it is retried, then ``dead``."""

    def __init__(self, limit_s: float) -> None:
        super().__init__(
            f"the stage ran past its time limit of {limit_s:g} s and was stopped; it is "
            "retried until its attempts run out. If the input is legitimately slow, raise "
            "IMGPIPE_STAGE_TIME_LIMITS_S for this stage kind"
        )
        self.limit_s = limit_s


@contextmanager
def soft_time_limit(limit_s: float | None) -> Iterator[None]:
    """Raise ``StageTimeLimitExceeded`` in this thread if the block runs past ``limit_s``."""
    if not limit_s or limit_s <= 0:
        yield
        return
    if threading.current_thread() is not threading.main_thread():
        log.debug("soft time limit not armed outside the main thread; the hard limit applies")
        yield
        return

    def expired(_signum: int, _frame: FrameType | None) -> None:
        raise StageTimeLimitExceeded(limit_s)

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, limit_s)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


_paused_since: float | None = None
_pause_listeners: list[Callable[[float], None]] = []


def on_pause_end(listener: Callable[[float], None]) -> None:
    """Call ``listener(seconds)`` after each pause: deadlines move by that much."""
    _pause_listeners.append(listener)


def time_limits_are_paused() -> bool:
    return _paused_since is not None


@contextmanager
def time_limits_paused() -> Iterator[None]:
    """Run the block (a model load) outside the stage's soft and hard limits."""
    global _paused_since
    if threading.current_thread() is not threading.main_thread() or _paused_since is not None:
        yield
        return
    remaining_s, _ = signal.setitimer(signal.ITIMER_REAL, 0)
    _paused_since = time.monotonic()
    try:
        yield
    finally:
        paused_s = time.monotonic() - _paused_since
        _paused_since = None
        for listener in _pause_listeners:
            listener(paused_s)
        if remaining_s > 0:
            signal.setitimer(signal.ITIMER_REAL, remaining_s)


class ComputeClock:
    """The hard deadline of the compute in progress, read by the watchdog thread."""

    def __init__(self) -> None:
        self._deadline: float | None = None
        on_pause_end(self._postpone)

    def _postpone(self, seconds: float) -> None:
        deadline = self._deadline
        if deadline is not None:
            self._deadline = deadline + seconds

    @contextmanager
    def running(self, limit_s: float | None) -> Iterator[None]:
        if not limit_s or limit_s <= 0:
            yield
            return
        self._deadline = time.monotonic() + hard_limit_s(limit_s)
        try:
            yield
        finally:
            self._deadline = None

    def overdue_s(self, now: float) -> float | None:
        """Seconds past the hard deadline, or None while within it (or idle)."""
        deadline = self._deadline
        if deadline is None or now <= deadline or time_limits_are_paused():
            return None
        return now - deadline
