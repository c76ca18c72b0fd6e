"""What a transaction leaves to do once it has committed: Celery messages, events, webhooks.

Every state change in imgpipe is a database transaction; its side effects on Redis (stage
messages, entries on ``imgpipe:events`` and ``reply_to`` streams, webhook deliveries) are
collected in an ``AfterCommit`` while the transaction runs and sent by ``deliver`` only
after it commits. A crash between the two delays work, never loses it: SQL holds the
state and the reaper re-sends what no worker claimed.

Both sides use it: the orchestrator (submit, advance, reaper) and the stage workers, which
run the DAG step in the transaction that records a stage's result (db/dag.py).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from imgpipe.contracts import CONTROL_QUEUE, WEBHOOK_TASK, bulk_queue
from imgpipe.events import EventPublisher, EventType, PendingEvent, envelope

__all__ = [
    "WEBHOOK_QUEUE",
    "AfterCommit",
    "Dispatch",
    "PendingEvent",
    "TaskSender",
    "deliver",
    "webhook_body",
]

log = logging.getLogger(__name__)

WEBHOOK_QUEUE = bulk_queue(CONTROL_QUEUE)
"""Webhook deliveries go behind interactive control work."""

TIME_LIMIT_GRACE_S = 10
"""Hard time limit = the stage's soft limit + this (the soft limit raises inside the task)."""


@dataclass(frozen=True)
class Dispatch:
    """One stage message to send: ``task_name(stage_run_id)`` on ``queue``."""

    task_name: str
    stage_run_id: int
    queue: str
    time_limit_s: int


class TaskSender(Protocol):
    """What ``deliver`` needs of a Celery app (``celery.Celery.send_task``)."""

    def send_task(self, name: str, args: Any = ..., **options: Any) -> Any: ...


@dataclass
class AfterCommit:
    dispatches: list[Dispatch] = field(default_factory=list)
    events: list[PendingEvent] = field(default_factory=list)
    webhooks: list[str] = field(default_factory=list)
    """JSON bodies for the ``imgpipe.webhook`` task."""

    def extend(self, other: AfterCommit) -> None:
        self.dispatches.extend(other.dispatches)
        self.events.extend(other.events)
        self.webhooks.extend(other.webhooks)

    def event(
        self,
        event: EventType,
        job_id: str,
        *,
        idempotency_key: str | None = None,
        reply_to: str | None = None,
        **fields: Any,
    ) -> None:
        self.events.append(PendingEvent(event, job_id, idempotency_key, reply_to, fields))

    def completed(
        self,
        job_id: str,
        payload: Mapping[str, Any],
        idempotency_key: str | None,
        reply_to: str | None,
        *,
        webhook: bool,
    ) -> None:
        """The job's ``completed`` event (and ``reply_to``), then its webhook if configured."""
        self.event(
            EventType.COMPLETED,
            job_id,
            idempotency_key=idempotency_key,
            reply_to=reply_to,
            **payload,
        )
        if webhook:
            self.webhooks.append(webhook_body(job_id, idempotency_key, payload))


def webhook_body(job_id: str, idempotency_key: str | None, completed: Mapping[str, Any]) -> str:
    """The webhook's JSON body: the completed event's fields as one object."""
    event = envelope(EventType.COMPLETED, job_id, idempotency_key, completed)
    return json.dumps(event, separators=(",", ":"), default=str)


def deliver(app: TaskSender, publisher: EventPublisher, after: AfterCommit) -> None:
    """Send what a committed transaction left to do. Stage messages first (they are what
    keeps jobs moving), then events in one Redis round trip, then webhooks.

    A broker error on a stage message propagates (the caller's task retries, or the
    reaper re-sends from SQL); events and webhooks are best-effort (logged)."""
    for d in after.dispatches:
        app.send_task(
            d.task_name,
            args=[d.stage_run_id],
            queue=d.queue,
            time_limit=d.time_limit_s + TIME_LIMIT_GRACE_S,
            soft_time_limit=d.time_limit_s,
        )
    if after.events:
        publisher.publish_many(after.events)
    for body in after.webhooks:
        try:
            app.send_task(WEBHOOK_TASK, args=[body], queue=WEBHOOK_QUEUE)
        except Exception as exc:
            log.warning("webhook not queued (%s); the event is on the events stream", exc)
