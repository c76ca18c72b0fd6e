"""The micro-batching model worker: many stage messages, one forward pass.

``imgpipe worker gpu --device cuda:N`` runs this consumer instead of a Celery prefork
pool. It reads the same Celery messages (``imgpipe.stage.<kind>(stage_run_id)``, JSON)
from the same queues, interactive before bulk, and:

1. takes up to ``batch_size`` messages (broker prefetch = ``batch_size``), waiting at most
   ``batch_wait_ms`` after the first for the rest;
2. hands them to ``StageExecutor.run_batch``: one transaction claims every row, inputs
   load on a few threads, one forward pass per model, one transaction records every
   result and steps every job; the next stages' messages go out after that commit;
3. acks each message only after its result is committed and the stages it continued
   locally have run (they need no broker; a hung broker holds the ack, not them). A
   database or broker outage is waited out holding the batch (bounded backoff with
   jitter, workers/outage.py); a transient stage error re-sends that one message with its
   backoff delay.

Why not celery-batches: it buffers requests in the worker's main process and hands the
pool a list, but it acks late-ack requests in the pool's *return* callback only, leaving
nothing to requeue a batch whose pool child died (``reject_on_worker_lost``), it needs a
prefetch far above ``worker_prefetch_multiplier=1`` for all tasks of the worker, its flush
timer is periodic (not "at most T ms after the first message"), and per-task time limits
do not apply to the batch. Our consumer is ~200 lines over kombu with exactly the ack
rule we need; Flower still sees each message as a task (task-received/started/succeeded/
failed/retried events, and worker heartbeats).

Remote control, the Flower events and the watchdog (which ends the process if one batch
runs past the longest time limit of its stages, plus grace) are workers/batching_control.py.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import FrameType
from typing import Any

from celery import Celery
from kombu.messaging import Consumer
from kombu.serialization import prepare_accept_content

from imgpipe.contracts import STAGE_TASK_PREFIX, stage_task_name
from imgpipe.errors import TransientError
from workers.batching_control import CONTINUATION_BATCHES, ConsumerControl
from workers.execute import ClaimRequest, Outcome, StageExecutor
from workers.monitor_events import EventSender
from workers.timelimits import on_pause_end

__all__ = ["BatchingConsumer", "Pending"]

log = logging.getLogger(__name__)

HEARTBEAT_S = 2.0
WATCHDOG_GRACE_S = 30.0
DEFAULT_BATCH_LIMIT_S = 600.0
"""Time limit of a batch whose messages carry none (and of locally continued stages)."""
MIN_DRAIN_S = 0.0005
"""Shortest wait for one more message: what "immediately available" means."""
POLL_S = 1.0
"""Longest idle wait for a message, so stop requests and held messages are seen."""
EVENTS_CLOSE_S = 5.0
"""How long a stopping consumer waits for its last Flower events to go out."""


@dataclass
class Pending:
    message: Any
    stage_run_id: int
    task_id: str
    task_name: str
    retries: int
    time_limit_s: float | None
    received_at: float = field(default_factory=time.monotonic)


def _eta_of(headers: dict[str, Any]) -> float | None:
    """Seconds from now until the message's ETA (``countdown`` retries), or None."""
    eta = headers.get("eta")
    if not eta:
        return None
    try:
        when = datetime.fromisoformat(str(eta))
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return (when - datetime.now(UTC)).total_seconds()


class BatchingConsumer(ConsumerControl):
    def __init__(
        self,
        app: Celery,
        executor: StageExecutor,
        queues: Sequence[str],
        *,
        batch_size: int,
        batch_wait_ms: float,
        hostname: str | None = None,
    ) -> None:
        self.app = app
        self.executor = executor
        self.queue_names = list(queues)
        self.batch_size = batch_size
        self.batch_wait_s = batch_wait_ms / 1000
        self.hostname = hostname or f"gpu-{os.getpid()}@{socket.gethostname()}"
        self._buffer: list[Pending] = []
        self._held: list[tuple[float, Pending]] = []
        self._stop = threading.Event()
        self._batch_deadline: float | None = None
        self._events: EventSender | None = None
        self._channel: Any = None
        self._consumer: Any = None
        self._accept = prepare_accept_content(["json"])  # type: ignore[no-untyped-call]
        # An outage is waited out inside the batch: a stop request ends the wait, and the
        # watchdog does not count the time spent waiting for the database or broker.
        self.executor.outage.stop = self._stop
        self.executor.outage.on_wait = self._postpone_watchdog
        on_pause_end(self._postpone_watchdog)  # a model load does not count either
        self.executor.continue_locally(self.queue_names, CONTINUATION_BATCHES * batch_size)

    # -- lifecycle ------------------------------------------------------------------------
    def stop(self, *_: object) -> None:
        """Warm shutdown: finish the batch in hand, leave prefetched messages unacked
        (the broker gives them back when the connection closes)."""
        self._stop.set()

    def install_signal_handlers(self) -> None:
        def handler(signum: int, _frame: FrameType | None) -> None:
            log.info("signal %d: stopping after the current batch", signum)
            self.stop()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    def run(self) -> None:
        threading.Thread(target=self._watchdog, name="imgpipe-watchdog", daemon=True).start()
        with self.app.connection_for_read() as conn:
            queues = [self.app.amqp.queues[name] for name in self.queue_names]
            channel = conn.channel()
            consumer = Consumer(  # type: ignore[no-untyped-call]
                channel,
                queues=queues,
                callbacks=[self._on_message],
                accept=["json"],
                on_decode_error=self._on_decode_error,
            )
            consumer.qos(prefetch_count=self.batch_size)  # type: ignore[no-untyped-call]
            self._channel = channel
            self._consumer = consumer
            self._listen_for_control(conn)
            with self.app.connection_for_write() as events_conn:
                # Task events are buffered and sent as one "task.multi" message per batch
                # (what Celery's own worker does): three publishes per message cost more
                # than the stage's bookkeeping.
                dispatcher = self.app.events.Dispatcher(
                    events_conn,
                    hostname=self.hostname,
                    buffer_group=["task"],
                    buffer_limit=max(3 * self.batch_size, 24),
                )
                self._events = EventSender(dispatcher)
                self._event("worker-online")
                log.info(
                    "worker %s on %s: queues %s, batch %d, wait %.1f ms",
                    self.hostname, self.executor.device, ",".join(self.queue_names),
                    self.batch_size, self.batch_wait_s * 1000,
                )  # fmt: skip
                try:
                    with consumer:
                        self._loop(conn)
                    self._event("worker-offline")
                finally:
                    self._release_continuations()
                    if self._events.close(EVENTS_CLOSE_S):
                        dispatcher.close()
                    else:
                        log.warning("Flower events not sent at exit: the broker did not take them")

    def _loop(self, conn: Any) -> None:
        """Fill a batch: flush when it is full, or when ``batch_wait_ms`` has passed since
        its first message and nothing more is immediately available (with a wait of 0:
        take whatever the broker has at once, then run)."""
        last_beat = 0.0
        while not self._stop.is_set():
            now = time.monotonic()
            if now - last_beat >= HEARTBEAT_S:
                self._event("worker-heartbeat", active=len(self._buffer))
                last_beat = now
            self._release_held(now)
            if len(self._buffer) >= self.batch_size:
                self._flush()
                continue
            timeout = POLL_S
            if self._buffer:
                timeout = max(0.0, self._buffer[0].received_at + self.batch_wait_s - now)
            if self._held:
                timeout = min(timeout, max(0.0, min(t for t, _ in self._held) - now))
            before = len(self._buffer)
            try:
                conn.drain_events(timeout=max(timeout, MIN_DRAIN_S))
            except TimeoutError:
                pass
            except OSError as exc:  # socket.timeout is TimeoutError; others: broker trouble
                log.warning("broker connection trouble: %s; reconnecting", exc)
                conn.ensure_connection(max_retries=None)
            if len(self._buffer) > before:
                self._fill_nowait()
            waited_s = time.monotonic() - self._buffer[0].received_at if self._buffer else 0.0
            if self._buffer and waited_s >= self.batch_wait_s:
                self._flush()

    def _fill_nowait(self) -> None:
        """Top the batch up with messages already waiting (one RPOP each, interactive
        queue first): no waiting, and the batch is exactly what the broker had."""
        if self._channel is None:
            return
        for name in self.queue_names:
            while len(self._buffer) < self.batch_size:
                try:
                    message = self._channel.basic_get(name)
                except Exception as exc:
                    log.warning("could not read more messages from %s: %s", name, exc)
                    return
                if message is None:
                    break
                message.accept = self._accept
                try:
                    body = message.decode()
                except Exception as exc:
                    self._on_decode_error(message, exc)
                    continue
                self._on_message(body, message)

    # -- messages -------------------------------------------------------------------------
    def _on_decode_error(self, message: Any, exc: Exception) -> None:
        log.error(
            "refused a message with content type %r: %s (only JSON is accepted); dropped",
            message.content_type, exc,
        )  # fmt: skip
        message.ack()

    def _on_message(self, body: Any, message: Any) -> None:
        headers = message.headers or {}
        name = str(headers.get("task", ""))
        task_id = str(headers.get("id", ""))
        args = body[0] if isinstance(body, list | tuple) and body else None
        if (
            not name.startswith(STAGE_TASK_PREFIX)
            or not isinstance(args, list | tuple)
            or len(args) != 1
            or not isinstance(args[0], int)
        ):
            log.error(
                "dropped message %s: task %r with args %r is not a stage message "
                "(imgpipe.stage.<kind>(stage_run_id)); send stage work only to model queues",
                task_id, name, args,
            )  # fmt: skip
            message.ack()
            return
        limits = headers.get("timelimit") or (None, None)
        pending = Pending(
            message,
            int(args[0]),
            task_id,
            name,
            int(headers.get("retries") or 0),
            float(limits[0]) if limits and limits[0] else None,
        )
        self._event(
            "task-received", uuid=task_id, name=name, args=repr(list(args)), kwargs="{}",
            retries=pending.retries, eta=headers.get("eta"),
        )  # fmt: skip
        delay_s = _eta_of(headers)
        if delay_s is not None and delay_s > 0:
            self._held.append((time.monotonic() + delay_s, pending))
        else:
            self._buffer.append(pending)

    def _release_held(self, now: float) -> None:
        if not self._held:
            return
        due = [p for t, p in self._held if t <= now]
        if due:
            self._held = [(t, p) for t, p in self._held if t > now]
            for p in due:
                p.received_at = now
            self._buffer.extend(due)

    # -- a batch --------------------------------------------------------------------------
    def _flush(self) -> None:
        batch, self._buffer = self._buffer[: self.batch_size], self._buffer[self.batch_size :]
        started = time.monotonic()
        # kinds compute one after another, each within its own limit (workers/timelimits.py)
        limits = {p.task_name: p.time_limit_s for p in batch if p.time_limit_s}
        limit_s = sum(limits.values()) if limits else DEFAULT_BATCH_LIMIT_S
        self._batch_deadline = started + limit_s + WATCHDOG_GRACE_S
        for p in batch:
            self._event("task-started", uuid=p.task_id, pid=os.getpid())
        try:
            outcomes = self.executor.run_batch(
                [ClaimRequest(p.stage_run_id, p.task_id) for p in batch]
            )
        except TransientError as exc:
            # Only when stopping mid-outage (run_batch waits out outages otherwise).
            log.warning("stopping: batch of %d not recorded (%s); requeued", len(batch), exc)
            for p in batch:
                self._event("task-retried", uuid=p.task_id, exception=str(exc))
                p.message.requeue()
            return
        finally:
            self._batch_deadline = None
        runtime_s = time.monotonic() - started
        settled: list[Pending] = []
        try:
            for p, outcome in zip(batch, outcomes, strict=True):
                self._settle(p, outcome, runtime_s)
                settled.append(p)  # a retry not re-sent is not acked away
            self._flush_events()
            # The continuations need no broker; the acks do. Acked after them, so a broker
            # that hangs stops this loop only once the jobs' local work is done (a message
            # re-delivered after a crash here finds its row finished: a no-op).
            self._run_continuations()
        finally:
            for p in settled:
                p.message.ack()

    def _release_continuations(self) -> None:
        try:
            self.executor.release_continuations()
        except Exception as exc:  # the reaper re-dispatches them after their deadline
            log.warning("stages claimed locally not handed back (%s); the reaper will", exc)

    def _run_continuations(self) -> None:
        """Run the stages this worker claimed for itself while persisting (the jobs' next
        stages on its own queues), then theirs, until none are left or a stop is asked."""
        while self.executor.continuations and not self._stop.is_set():
            started = time.monotonic()
            self._batch_deadline = started + DEFAULT_BATCH_LIMIT_S + WATCHDOG_GRACE_S
            try:
                done = self.executor.run_continuations()
            except TransientError as exc:
                # the rows stay ``running`` with a deadline: the reaper re-dispatches them
                log.warning("continued stages not recorded (%s); the reaper will re-run", exc)
                self.executor.continuations.clear()
                return
            finally:
                self._batch_deadline = None
            runtime_s = time.monotonic() - started
            for claim, outcome in done:
                name = stage_task_name(claim.kind)
                self._event(
                    "task-received", uuid=claim.task_id, name=name,
                    args=repr([claim.stage_run_id]), kwargs="{}", retries=0, eta=None,
                )  # fmt: skip
                self._event("task-started", uuid=claim.task_id, pid=os.getpid())
                if outcome.retry_in_s is not None:
                    self.executor.outage.call(
                        f"re-sending stage run {claim.stage_run_id}",
                        functools.partial(
                            self.app.send_task, name, args=[claim.stage_run_id],
                            queue=claim.queue, countdown=outcome.retry_in_s,
                        ),
                    )  # fmt: skip
                    self._event("task-retried", uuid=claim.task_id, exception=outcome.error)
                elif outcome.status in ("failed", "dead"):
                    self._event("task-failed", uuid=claim.task_id, exception=outcome.error)
                else:
                    self._event(
                        "task-succeeded", uuid=claim.task_id, result=outcome.status,
                        runtime=runtime_s,
                    )  # fmt: skip
            self._flush_events()

    def _settle(self, p: Pending, outcome: Outcome, runtime_s: float) -> None:
        """Report a message whose outcome is committed (a retry is re-sent first); the
        ack follows in ``_flush``."""
        if outcome.retry_in_s is not None:
            retry_in_s = outcome.retry_in_s
            # the retry goes out before the ack: an outage is waited out, not acked away
            self.executor.outage.call(
                f"re-sending stage run {p.stage_run_id}",
                lambda: self.app.send_task(
                    p.task_name,
                    args=[p.stage_run_id],
                    queue=p.message.delivery_info.get("routing_key") or self.queue_names[0],
                    countdown=retry_in_s,
                    task_id=p.task_id,
                    retries=p.retries + 1,
                ),
            )
            self._event("task-retried", uuid=p.task_id, exception=outcome.error or "")
        elif outcome.status in ("failed", "dead"):
            self._event("task-failed", uuid=p.task_id, exception=outcome.error or outcome.status)
        else:
            self._event("task-succeeded", uuid=p.task_id, result=outcome.status, runtime=runtime_s)
