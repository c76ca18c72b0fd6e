"""What a batching consumer (workers/batching.py) does besides its batches.

- **Remote control**: it answers Celery remote control like a Celery worker would
  (``celery inspect ping``, ``imgpipe up``'s readiness check, Flower's worker list), and
  takes ``cancel_consumer`` / ``add_consumer`` for its queues.
- **Flower events**: each message shows as a task (task-received/started/succeeded/
  failed/retried events, buffered and sent as one ``task.multi`` message per batch),
  plus worker heartbeats, published from a thread of their own
  (workers/monitor_events.py): monitoring never stops the work, not even on a hung
  broker.
- **The watchdog**: it ends the process if one batch runs past the longest time limit of
  its stages (plus grace): the supervisor restarts the worker and the reaper re-runs the
  stage rows (a hung forward pass cannot be interrupted from Python).

``ConsumerControl`` is a base class of ``BatchingConsumer``: the state it reads is set up
by ``BatchingConsumer`` and declared here for the type checker.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import TYPE_CHECKING, Any

from celery import Celery

from workers.execute import StageExecutor
from workers.monitor_events import EventSender
from workers.timelimits import time_limits_are_paused

if TYPE_CHECKING:
    from workers.batching import Pending

__all__ = ["CONTINUATION_BATCHES", "WATCHDOG_TICK_S", "ConsumerControl"]

log = logging.getLogger(__name__)

WATCHDOG_TICK_S = 0.5
CONTINUATION_BATCHES = 4
"""A persist may claim up to this many batches' worth of its jobs' next stages locally."""


class ConsumerControl:
    """Remote control, Flower events and the watchdog of a ``BatchingConsumer``."""

    app: Celery
    executor: StageExecutor
    queue_names: list[str]
    batch_size: int
    batch_wait_s: float
    hostname: str
    _buffer: list[Pending]
    _held: list[tuple[float, Pending]]
    _stop: threading.Event
    _batch_deadline: float | None
    _events: EventSender | None
    _consumer: Any

    # -- remote control -------------------------------------------------------------------
    def _listen_for_control(self, conn: Any) -> None:
        """Answer Celery remote control (``celery inspect ping``, ``imgpipe up``'s
        readiness check, Flower's worker list) like a Celery worker would."""
        node = self.app.control.mailbox(conn).Node(
            self.hostname,
            state=None,
            handlers={
                "ping": lambda _state, **_kw: {"ok": "pong"},
                "stats": lambda _state, **_kw: self.stats(),
                "active_queues": lambda _state, **_kw: [
                    {"name": name} for name in self.queue_names
                ],
                "cancel_consumer": lambda _state, queue, **_kw: self.cancel_queue(queue),
                "add_consumer": lambda _state, queue, **_kw: self.add_queue(queue),
            },
        )
        node.listen(conn.channel())

    def cancel_queue(self, queue: str) -> dict[str, str]:
        """Remote control ``cancel_consumer``: stop taking messages from ``queue``."""
        if queue in self.queue_names:
            self.queue_names.remove(queue)
            if self._consumer is not None:
                self._consumer.cancel_by_queue(queue)
            self.executor.continue_locally(self.queue_names, CONTINUATION_BATCHES * self.batch_size)
        return {"ok": f"no longer consuming from {queue}"}

    def add_queue(self, queue: str) -> dict[str, str]:
        """Remote control ``add_consumer``: take messages from ``queue`` too (after the
        queues already consumed, so re-adding interactive then bulk keeps their order)."""
        if queue not in self.queue_names:
            self.queue_names.append(queue)
            if self._consumer is not None:
                self._consumer.add_queue(self.app.amqp.queues[queue])
                self._consumer.consume()
            self.executor.continue_locally(self.queue_names, CONTINUATION_BATCHES * self.batch_size)
        return {"ok": f"consuming from {queue}"}

    def stats(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "kind": "imgpipe micro-batching model worker",
            "device": self.executor.device,
            "batch_size": self.batch_size,
            "batch_wait_ms": self.batch_wait_s * 1000,
            "buffered": len(self._buffer),
            "held_for_eta": len(self._held),
        }

    # -- Flower events and the watchdog ---------------------------------------------------
    def _flush_events(self) -> None:
        """Send the buffered task events (from the events thread: never blocks)."""
        if self._events is not None:
            self._events.flush()

    def _event(self, event_type: str, **fields: Any) -> None:
        """Queue one Flower event (workers/monitor_events.py: never blocks)."""
        if self._events is not None:
            self._events.send(event_type, **fields)

    def _postpone_watchdog(self, seconds: float) -> None:
        """Time spent waiting out an outage does not count against the batch's limit."""
        deadline = self._batch_deadline
        if deadline is not None:
            self._batch_deadline = deadline + seconds

    def _watchdog(self) -> None:
        """Exit the process when a stage's compute runs past its hard time limit (the soft
        limit could not stop it: stuck in native code), or a whole batch past the longest
        limit of its stages + WATCHDOG_GRACE_S (a hung database call, say)."""
        while not self._stop.wait(WATCHDOG_TICK_S):
            now = time.monotonic()
            overdue_s = self.executor.compute_clock.overdue_s(now)
            deadline = self._batch_deadline
            if time_limits_are_paused() or (
                overdue_s is None and (deadline is None or now <= deadline)
            ):
                continue
            what = "a stage's compute" if overdue_s is not None else "a batch"
            log.critical(
                "%s ran past its hard time limit; exiting so the supervisor restarts this "
                "worker and the reaper re-runs its stage runs",
                what,
            )
            os._exit(70)
