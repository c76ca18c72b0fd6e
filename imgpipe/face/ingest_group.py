"""``imgpipe ingest --consumers N``: N consumer processes of the submit group on this host.

Each child is a plain ``imgpipe ingest`` process (its own consumer name in the group, its
own database and Redis connections), so N of them use N cores for decoding and hashing.
The parent only supervises: a child that exits while the group runs is started again
(entries it held are reclaimed by the others with XAUTOCLAIM meanwhile), and SIGTERM or
Ctrl-C is passed on to every child, which finishes its batch and exits.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import threading
import time

__all__ = ["STOP_TIMEOUT_S", "run_consumer_processes"]

log = logging.getLogger(__name__)

STOP_TIMEOUT_S = 30.0
"""How long a child may take to finish its batch after SIGTERM before it is killed."""
RESTART_DELAY_S = 1.0


def _start(name: str | None, loglevel: str) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "imgpipe", "ingest", "--loglevel", loglevel]
    if name is not None:
        command += ["--consumer", name]
    return subprocess.Popen(command)


def run_consumer_processes(names: list[str | None], loglevel: str, stop: threading.Event) -> None:
    """Run one child per name (None: the child's default host-pid name) until ``stop``."""
    children = [_start(name, loglevel) for name in names]
    log.info("ingest: %d consumer processes (pids %s)", len(children), [c.pid for c in children])
    try:
        while not stop.wait(RESTART_DELAY_S):
            for i, child in enumerate(children):
                code = child.poll()
                if code is not None:
                    log.warning("ingest: consumer pid %d exited (%d); restarting", child.pid, code)
                    children[i] = _start(names[i], loglevel)
    finally:
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for child in children:
            try:
                child.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                log.error("ingest: consumer pid %d did not stop; killing it", child.pid)
                child.kill()
                child.wait()
