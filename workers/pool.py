"""A pool of batching consumer processes: ``imgpipe worker cpu`` with ``cpu_concurrency``.

The parent forks ``processes`` children before it imports anything heavy or starts a
thread; each child builds its own executor (database engine, Redis clients, blob store)
and runs a ``BatchingConsumer`` on the worker's queues. The parent only supervises:

- a child that dies unexpectedly is replaced (its unacked messages come back through the
  reaper, which re-dispatches stage rows from SQL);
- SIGTERM / SIGINT to the parent is passed to every child's main process (and to a
  child started while the signal arrived), which finishes the batch in hand and hands
  un-started work back (warm shutdown); the parent exits when they have, and SIGKILLs
  stragglers after ``stop_timeout_s`` (give it the longest stage time limit + grace:
  a consumer's watchdog ends a batch 30 s past its limit anyway).
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


def run_pool(
    processes: int,
    target: Callable[[int], None],
    stop_timeout_s: float = STOP_TIMEOUT_S,
    on_exit: Callable[[int], None] | None = None,
) -> None:
    """Run ``target(index)`` in ``processes`` forked children until told to stop;
    ``on_exit(pid)`` is called for each child that exits (its metrics are dropped)."""
    children: dict[int, int] = {_spawn(target, i): i for i in range(processes)}
    stop_signal: int | None = None
    signalled: set[int] = set()

    def stop(signum: int, _frame: FrameType | None) -> None:
        nonlocal stop_signal
        if stop_signal is None:
            log.info(
                "signal %d: stopping %d worker processes after their batch", signum, len(children)
            )
        stop_signal = stop_signal or signum

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    stop_deadline: float | None = None
    while children:
        if stop_signal is not None:
            # Here, not in the handler: a child forked while the signal arrived is in
            # ``children`` by now and gets it too.
            for pid in children.keys() - signalled:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, stop_signal)
                signalled.add(pid)
            stop_deadline = stop_deadline or time.monotonic() + stop_timeout_s
            if time.monotonic() > stop_deadline:
                log.warning(
                    "worker processes %s did not stop in time; killing them", sorted(children)
                )
                for straggler in children:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(straggler, signal.SIGKILL)
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            time.sleep(0.1)
            continue
        index = children.pop(pid, None)
        if on_exit is not None:
            on_exit(pid)
        if index is None or stop_signal is not None:
            continue
        log.warning(
            "worker process %d (pid %d) exited with status %d; starting another",
            index, pid, os.waitstatus_to_exitcode(status),
        )  # fmt: skip
        time.sleep(RESTART_PAUSE_S)
        children[_spawn(target, index)] = index
