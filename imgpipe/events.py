"""Job events on the ``imgpipe:events`` stream (and a submitter's ``reply_to`` stream).

One entry per state change. Field values are JSON-encoded strings so any language can
read them with a plain Redis client. Publishing happens after the database commit and is
best-effort: a Redis outage delays nothing and loses no job (SQL holds the truth), but
the event for that change is logged and dropped.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import redis

from imgpipe.contracts import EVENTS_STREAM

__all__ = ["EventPublisher", "EventType", "PendingEvent", "encode_fields", "envelope"]

log = logging.getLogger(__name__)


class EventType(StrEnum):
    ACCEPTED = "accepted"
    REJECTED = "rejected"
    STAGE_SUCCEEDED = "stage_succeeded"
    STAGE_FAILED = "stage_failed"
    STAGE_SKIPPED = "stage_skipped"
    COMPLETED = "completed"
    REVIEWED = "reviewed"


@dataclass(frozen=True)
class PendingEvent:
    """An event decided inside a transaction, published after it commits."""

    event: EventType
    job_id: str
    idempotency_key: str | None = None
    reply_to: str | None = None
    fields: Mapping[str, Any] = field(default_factory=dict)

    def entry(self) -> dict[str, str]:
        return encode_fields(envelope(self.event, self.job_id, self.idempotency_key, self.fields))


def envelope(
    event: EventType, job_id: str, idempotency_key: str | None, fields: Mapping[str, Any]
) -> dict[str, Any]:
    """Every event as one object (a stream entry's fields, a webhook's body): the one place
    the envelope is built. ``fields`` are the event's own (for ``completed``:
    db/dag.py ``completed_payload``)."""
    return {
        "event": str(event),
        "job_id": job_id,
        "idempotency_key": idempotency_key,
        "at": time.time(),
        **fields,
    }


def encode_fields(fields: Mapping[str, Any]) -> dict[str, str]:
    return {k: json.dumps(v, separators=(",", ":"), default=str) for k, v in fields.items()}


class EventPublisher:
    def __init__(self, redis_url: str, maxlen: int = 100_000) -> None:
        self.redis_url = redis_url
        self.maxlen = maxlen
        self._client: redis.Redis | None = None

    @property
    def client(self) -> redis.Redis:
        if self._client is None:
            self._client = redis.Redis.from_url(self.redis_url, socket_timeout=5)
        return self._client

    def publish(
        self,
        event: EventType,
        job_id: str,
        *,
        idempotency_key: str | None = None,
        reply_to: str | None = None,
        **fields: Any,
    ) -> str | None:
        """Append one event; returns its stream id, or None if Redis was unreachable."""
        ids = self.publish_many([PendingEvent(event, job_id, idempotency_key, reply_to, fields)])
        return ids[0] if ids else None

    def publish_many(self, events: Sequence[PendingEvent]) -> list[str]:
        """Append events in one round trip; returns their ids on the events stream (empty
        if Redis was unreachable: the events are logged and dropped, SQL has the state)."""
        if not events:
            return []
        try:
            pipe = self.client.pipeline(transaction=False)
            for pending in events:
                entry = pending.entry()
                pipe.xadd(EVENTS_STREAM, entry, maxlen=self.maxlen, approximate=True)  # type: ignore[arg-type]
                if pending.reply_to:
                    pipe.xadd(pending.reply_to, entry, maxlen=self.maxlen, approximate=True)  # type: ignore[arg-type]
            results = pipe.execute()
        except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
            log.warning(
                "%d event(s) (first: %s for job %s) not published: %s",
                len(events), events[0].event, events[0].job_id, exc,
            )  # fmt: skip
            return []
        ids: list[str] = []
        position = 0
        for pending in events:
            stream_id = results[position]
            ids.append(stream_id.decode() if isinstance(stream_id, bytes) else str(stream_id))
            position += 2 if pending.reply_to else 1
        return ids
