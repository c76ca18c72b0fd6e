"""What a transaction leaves to do once it has committed: Celery messages, events, webhooks.

Every state change in imgpipe is a database transaction; its side effects on Redis (stage
messages, entries on ``imgpipe:events`` and ``reply_to`` streams, webhook deliveries) are
collected in an ``AfterCommit`` while the transaction runs and sent by ``deliver`` only
after it commits. A crash between the two delays work, never loses it:

- stage messages: SQL holds the ``dispatched`` row and the reaper re-sends what no worker
  claimed;
- answers (``accepted``, ``rejected``, ``completed``, ``reviewed``) and webhooks: the
  transaction also wrote them to the outbox (db/outbox.py ``write_outbox``); ``deliver``
  reports what it published to an ``OutboxAcks``, which removes those rows, and the
  relay re-sends rows that stay behind (at least once; consumers dedupe by ``event_id``);
- per-stage progress events are best-effort.

Both sides use it: the orchestrator (submit, advance, reaper) and the stage workers, which
run the DAG step in the transaction that records a stage's result (db/dag.py).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from imgpipe.contracts import CONTROL_QUEUE, WEBHOOK_TASK, bulk_queue
from imgpipe.events import EventPublisher, EventType, PendingEvent, new_event_id

__all__ = [
    "WEBHOOK_QUEUE",
    "AfterCommit",
    "Dispatch",
    "OutboxAcks",
    "PendingEvent",
    "PendingWebhook",
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


@dataclass(frozen=True)
class PendingWebhook:
    """One ``imgpipe.webhook`` task to send; ``id`` is its outbox row."""

    id: str
    body: str


class TaskSender(Protocol):
    """What ``deliver`` needs of a Celery app (``celery.Celery.send_task``)."""

    def send_task(self, name: str, args: Any = ..., **options: Any) -> Any: ...


class OutboxAcks(Protocol):
    """Told which outbox rows were handed to Redis, so they can be removed (db/outbox.py)."""

    def delivered(self, ids: Sequence[str]) -> None: ...


@dataclass
class AfterCommit:
    dispatches: list[Dispatch] = field(default_factory=list)
    events: list[PendingEvent] = field(default_factory=list)
    webhooks: list[PendingWebhook] = field(default_factory=list)
    outboxed: set[str] = field(default_factory=set)
    """Ids of the events and webhooks the transaction wrote to the outbox."""

    def extend(self, other: AfterCommit) -> None:
        self.dispatches.extend(other.dispatches)
        self.events.extend(other.events)
        self.webhooks.extend(other.webhooks)
        self.outboxed.update(other.outboxed)

    def event(
        self,
        event: EventType,
        job_id: str,
        *,
        idempotency_key: str | None = None,
        reply_to: str | None = None,
        **fields: Any,
    ) -> PendingEvent:
        pending = PendingEvent(event, job_id, idempotency_key, reply_to, fields)
        self.events.append(pending)
        return pending

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
        pending = self.event(
            EventType.COMPLETED,
            job_id,
            idempotency_key=idempotency_key,
            reply_to=reply_to,
            **payload,
        )
        if webhook:
            self.webhooks.append(PendingWebhook(new_event_id(), webhook_body(pending)))


def webhook_body(completed: PendingEvent) -> str:
    """The webhook's JSON body: the completed event's fields as one object (its
    ``event_id`` too, so receivers can deduplicate)."""
    event = {
        "event": str(completed.event),
        "event_id": completed.event_id,
        "job_id": completed.job_id,
        "idempotency_key": completed.idempotency_key,
        "at": completed.at,
        **completed.fields,
    }
    return json.dumps(event, separators=(",", ":"), default=str)


def deliver(
    app: TaskSender, publisher: EventPublisher, after: AfterCommit, acks: OutboxAcks
) -> None:
    """Send what a committed transaction left to do. Stage messages first (they are what
    keeps jobs moving), then events in one Redis round trip, then webhooks; the outbox
    rows of what went out are reported to ``acks``.

    A broker error on a stage message propagates (the caller's task retries, or the
    reaper re-sends from SQL; the answers stay in the outbox for the relay). A Redis error
    on events or webhooks is logged: answers stay in the outbox, progress events are lost.
    """
    for d in after.dispatches:
        app.send_task(
            d.task_name,
            args=[d.stage_run_id],
            queue=d.queue,
            time_limit=d.time_limit_s + TIME_LIMIT_GRACE_S,
            soft_time_limit=d.time_limit_s,
        )
    delivered: list[str] = []
    if after.events and publisher.publish_events(after.events):
        delivered += [e.event_id for e in after.events if e.event_id in after.outboxed]
    for webhook in after.webhooks:
        try:
            app.send_task(WEBHOOK_TASK, args=[webhook.body], queue=WEBHOOK_QUEUE)
        except Exception as exc:
            log.warning("webhook not queued (%s); the outbox relay will send it again", exc)
            continue
        if webhook.id in after.outboxed:
            delivered.append(webhook.id)
    if delivered:
        acks.delivered(delivered)
