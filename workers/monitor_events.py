"""Flower events of a batching consumer, sent from a thread of their own.

The consumer's loop hands each event (and each "flush the buffered task events") to a
bounded queue and goes on; the ``imgpipe-events`` thread publishes them through Celery's
``EventDispatcher``. Monitoring is then off the work path: a broker that hangs without
closing its connections (stopped, failover, a dropped NAT entry) blocks this thread's
publish, not the stages. While it is blocked, events beyond ``MAX_QUEUED`` are dropped and
counted (Flower misses them; the results are in SQL).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from typing import Any

__all__ = ["MAX_QUEUED", "EventSender"]

log = logging.getLogger(__name__)

MAX_QUEUED = 10_000
"""Events waiting to be published; more are dropped."""

_FLUSH: tuple[str, dict[str, Any]] = ("flush", {})
_STOP: tuple[str, dict[str, Any]] = ("stop", {})


class EventSender:
    """Publishes ``dispatcher``'s events from the ``imgpipe-events`` thread."""

    def __init__(self, dispatcher: Any, max_queued: int = MAX_QUEUED) -> None:
        self.dispatcher = dispatcher
        self.dropped = 0
        self._queue: queue.Queue[tuple[str, dict[str, Any]]] = queue.Queue(max_queued)
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._run, name="imgpipe-events", daemon=True)
        self._thread.start()

    def send(self, event_type: str, **fields: Any) -> None:
        """Queue one event; never blocks."""
        self._put((event_type, fields))

    def flush(self) -> None:
        """Ask for the buffered task events to go out as one message; never blocks."""
        self._put(_FLUSH)

    def close(self, timeout_s: float) -> bool:
        """Send what is queued, then stop the thread; wait at most ``timeout_s``. False when
        the thread is still blocked (a hung broker): it is a daemon, and it ends by itself
        once the broker takes the queued events."""
        self._closing.set()
        # wakes a thread waiting for an event; a full queue means the thread is busy, and
        # it sees ``_closing`` once the queue is empty
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait(_STOP)
        self._thread.join(timeout_s)
        return not self.running

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def _put(self, item: tuple[str, dict[str, Any]]) -> None:
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.warning(
                    "%d Flower event(s) dropped: the broker has not taken events for a "
                    "while (the stages go on; results are in SQL)", self.dropped,
                )  # fmt: skip

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is not _FLUSH and item is not _STOP:  # _STOP only wakes the thread
                    event_type, fields = item
                    self.dispatcher.send(event_type, **fields)
                if item is _FLUSH or self._finished():
                    self.dispatcher.flush(errors=False)
            except Exception as exc:  # monitoring must never stop the work
                log.debug("event not sent: %s", exc)
            if self._finished():
                return

    def _finished(self) -> bool:
        """Closing, and nothing left to send."""
        return self._closing.is_set() and self._queue.empty()
