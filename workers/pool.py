"""A pool of batching consumer processes: ``imgpipe worker cpu`` with ``cpu_concurrency``.

The parent forks ``processes`` children before it imports anything heavy or starts a
thread; each child builds its own executor (database engine, Redis clients, blob store)
and runs a ``BatchingConsumer`` on the worker's queues. The parent only supervises:

- a child that dies unexpectedly is replaced (its unacked messages come back through the
  reaper, which re-dispatches stage rows from SQL);
- SIGTERM / SIGINT to the parent is passed to every child, which finishes the batch in
  hand (warm shutdown); the parent exits when they have, and SIGKILLs stragglers after
  ``STOP_TIMEOUT_S``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable
from types import FrameType

__all__ = ["run_pool"]

log = logging.getLogger(__name__)

STOP_TIMEOUT_S = 30.0
RESTART_PAUSE_S = 1.0


def _spawn(target: Callable[[int], None], index: int) -> int:
    pid = os.fork()
    if pid == 0:  # the child
        code = 0
        try:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            target(index)
        except BaseException:
            log.exception("worker process %d crashed", index)
            code = 1
        finally:
            os._exit(code)
    return pid


def run_pool(processes: int, target: Callable[[int], None]) -> None:
    """Run ``target(index)`` in ``processes`` forked children until told to stop."""
    children: dict[int, int] = {_spawn(target, i): i for i in range(processes)}
    stopping = False

    def stop(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    stop_deadline: float | None = None
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            if stopping:
                stop_deadline = stop_deadline or time.monotonic() + STOP_TIMEOUT_S
                if time.monotonic() > stop_deadline:
                    for straggler in children:
                        os.kill(straggler, signal.SIGKILL)
            time.sleep(0.1)
            continue
        index = children.pop(pid, None)
        if index is None or stopping:
            continue
        log.warning(
            "worker process %d (pid %d) exited with status %d; starting another",
            index, pid, os.waitstatus_to_exitcode(status),
        )  # fmt: skip
        time.sleep(RESTART_PAUSE_S)
        children[_spawn(target, index)] = index
