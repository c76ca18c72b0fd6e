"""The transactional outbox: answers are written with the state change that decides them.

A transaction that accepts, rejects, completes or reviews a job (and one that queues a
webhook) calls ``write_outbox`` before it commits: one executemany inserts a row per
answer event (its stream keys and encoded fields) and per webhook body. After the commit
``imgpipe.aftercommit.deliver`` publishes them and reports the rows it handed to Redis to
an ``OutboxAcks``, which removes them:

- ``ImmediateAcks`` (the orchestrator): one ``DELETE ... WHERE id IN (...)`` transaction
  per delivered batch;
- ``DeferredAcks`` (stage workers): no transaction of its own on the busy path — the
  worker's next persist transaction deletes the ids (``take`` + ``delete_rows``); a
  background thread deletes them after ``DEFERRED_FLUSH_S`` if no transaction came.

Rows still present ``IMGPIPE_OUTBOX_RELAY_AFTER_S`` after they were written (the writer was
killed between commit and publish, or Redis refused them) are re-sent by ``relay``, which
the orchestrator runs in every reaper pass and when it starts. Delivery is therefore at
least once; every event carries ``event_id`` (the row id) for consumers to deduplicate.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import replace
from datetime import timedelta
from typing import Any

from sqlalchemy import delete, insert, select
from sqlalchemy.orm import Session

from db.engine import session_scope
from db.models import JobReply, OutboxRow, utcnow
from imgpipe.aftercommit import WEBHOOK_QUEUE, AfterCommit, TaskSender
from imgpipe.contracts import WEBHOOK_TASK
from imgpipe.errors import TransientError
from imgpipe.events import EventPublisher

__all__ = [
    "DEFERRED_FLUSH_S",
    "DeferredAcks",
    "ImmediateAcks",
    "delete_rows",
    "relay",
    "write_outbox",
]

log = logging.getLogger(__name__)

EVENT = "event"
WEBHOOK = "webhook"
DELETE_CHUNK = 500
RELAY_BATCH = 500
DEFERRED_FLUSH_S = 0.5
"""How long a stage worker leaves delivered ids for its next transaction to delete."""


def write_outbox(session: Session, after: AfterCommit, *, fan_out: bool = True) -> None:
    """Insert the outbox rows of ``after``'s answers and webhooks (one executemany),
    inside the caller's transaction. With ``fan_out``, ``completed``/``reviewed`` events
    also go to the reply_to of every duplicate submission of their job (``job_replies``,
    one query; a transaction that creates its jobs passes False: nobody can have
    subscribed to a job that is not committed yet). Progress events are not written
    (best-effort)."""
    fanned = {e.job_id for e in after.events if e.event.fans_out and e.on_events_stream}
    fan_out_jobs = fanned if fan_out else set()
    if fan_out_jobs:
        subscribers: dict[str, list[str]] = defaultdict(list)
        found = session.execute(
            select(JobReply.job_id, JobReply.reply_to)
            .where(JobReply.job_id.in_(fan_out_jobs))
            .order_by(JobReply.created_at)
        )
        for job_id, reply_to in found:
            subscribers[job_id].append(reply_to)
        if subscribers:
            after.events = [
                replace(e, also_to=(*e.also_to, *subscribers[e.job_id]))
                if e.event.fans_out and e.on_events_stream and e.job_id in subscribers
                else e
                for e in after.events
            ]
    now = utcnow()
    rows: list[dict[str, Any]] = [
        {
            "id": e.event_id,
            "kind": EVENT,
            "streams": e.streams(),
            "payload": json.dumps(e.entry(), separators=(",", ":")),
            "created_at": now,
        }
        for e in after.events
        if e.event.is_answer and e.event_id not in after.outboxed
    ]
    rows += [
        {"id": w.id, "kind": WEBHOOK, "streams": [], "payload": w.body, "created_at": now}
        for w in after.webhooks
        if w.id not in after.outboxed
    ]
    if rows:
        session.execute(insert(OutboxRow), rows)
        after.outboxed.update(row["id"] for row in rows)


def delete_rows(session: Session, ids: Sequence[str]) -> None:
    """Remove delivered rows: ``DELETE ... WHERE id IN (...)`` per chunk, ids in order
    (every deleter takes row locks in the same order on PostgreSQL)."""
    ordered = sorted(set(ids))
    for start in range(0, len(ordered), DELETE_CHUNK):
        chunk = ordered[start : start + DELETE_CHUNK]
        session.execute(delete(OutboxRow).where(OutboxRow.id.in_(chunk)))


def _delete_delivered(database_url: str, ids: Sequence[str], tolerated: type[Exception]) -> None:
    """Remove delivered rows in a short transaction of their own; a ``tolerated`` error
    leaves them for the relay (at-least-once: consumers deduplicate by event_id)."""
    try:
        with session_scope(database_url) as session:
            delete_rows(session, ids)
    except tolerated as exc:
        log.warning(
            "%d delivered outbox row(s) not removed (%s); the relay will send them "
            "again, consumers deduplicate by event_id", len(ids), exc,
        )  # fmt: skip


class ImmediateAcks:
    """Delete delivered rows at once, one short transaction per delivered batch."""

    def __init__(self, database_url: str) -> None:
        self.database_url = database_url

    def delivered(self, ids: Sequence[str]) -> None:
        _delete_delivered(self.database_url, ids, TransientError)


class DeferredAcks:
    """Delivered ids wait for the owner's next transaction (``take`` + ``delete_rows``);
    a daemon thread deletes whatever waited ``flush_after_s`` (an idle worker)."""

    def __init__(self, database_url: str, flush_after_s: float = DEFERRED_FLUSH_S) -> None:
        self.database_url = database_url
        self.flush_after_s = flush_after_s
        self._ids: list[str] = []
        self._oldest_s = 0.0
        self._cond = threading.Condition()
        self._thread_pid: int | None = None

    def delivered(self, ids: Sequence[str]) -> None:
        if not ids:
            return
        with self._cond:
            if not self._ids:
                self._oldest_s = time.monotonic()
            self._ids.extend(ids)
            if self._thread_pid != os.getpid():  # first use, or a forked child
                self._thread_pid = os.getpid()
                threading.Thread(
                    target=self._flush_forever, name="imgpipe-outbox-acks", daemon=True
                ).start()
            self._cond.notify()

    def take(self) -> list[str]:
        """The ids waiting to be deleted; the caller deletes them in its transaction (and
        hands them back with ``delivered`` if that transaction fails)."""
        with self._cond:
            ids, self._ids = self._ids, []
            return ids

    def _flush_forever(self) -> None:
        while True:
            with self._cond:
                while True:
                    if self._ids:
                        wait_s = self._oldest_s + self.flush_after_s - time.monotonic()
                        if wait_s <= 0:
                            break
                        self._cond.wait(wait_s)
                    else:
                        self._cond.wait()
                ids, self._ids = self._ids, []
            # a background thread: no error may end it
            _delete_delivered(self.database_url, ids, Exception)


def relay(
    database_url: str,
    publisher: EventPublisher,
    sender: TaskSender,
    older_than_s: float,
    batch: int = RELAY_BATCH,
) -> int:
    """Re-send outbox rows written more than ``older_than_s`` ago and still present (their
    writer died between commit and publish, or Redis refused them), oldest first, then
    remove them. Returns how many rows were sent. Redis or database errors end the pass
    (logged); the rows stay for the next one."""
    sent = 0
    while True:
        cutoff = utcnow() - timedelta(seconds=older_than_s)
        with session_scope(database_url) as session:
            rows = session.execute(
                select(OutboxRow.id, OutboxRow.kind, OutboxRow.streams, OutboxRow.payload)
                .where(OutboxRow.created_at < cutoff)
                .order_by(OutboxRow.created_at)
                .limit(batch)
            ).all()
        if not rows:
            return sent
        events = [(list(streams), json.loads(payload)) for _, kind, streams, payload in rows
                  if kind == EVENT]  # fmt: skip
        if events and not publisher.publish_entries(events):
            return sent
        delivered = [row_id for row_id, kind, _, _ in rows if kind == EVENT]
        for row_id, kind, _, payload in rows:
            if kind != WEBHOOK:
                continue
            try:
                sender.send_task(WEBHOOK_TASK, args=[payload], queue=WEBHOOK_QUEUE)
            except Exception as exc:
                log.warning("outbox relay: webhook %s not queued: %s", row_id, exc)
                continue
            delivered.append(row_id)
        with session_scope(database_url) as session:
            delete_rows(session, delivered)
        sent += len(delivered)
        log.warning(
            "outbox relay: re-sent %d answer(s) that were committed but not delivered "
            "(a process died between commit and publish, or Redis refused them)",
            len(delivered),
        )
        if len(rows) < batch or len(delivered) < len(rows):
            return sent
