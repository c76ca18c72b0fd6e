"""Job events on the ``imgpipe:events`` stream (and submitters' ``reply_to`` streams).

One entry per state change. Field values are JSON-encoded strings so any language can
read them with a plain Redis client. Every event carries an ``event_id`` (a uuid4, hex):
delivery is at least once, and consumers deduplicate by it.

*Answers* (``accepted``, ``rejected``, ``completed``, ``reviewed``) are written to the
outbox (db/outbox.py) in the transaction that decides them and relayed until Redis took
them. Per-stage progress events (``stage_*``) are best-effort: published after the
commit, logged and dropped if Redis is unreachable (docs/submitting.md says why).
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import redis

from imgpipe.contracts import EVENTS_STREAM

__all__ = ["EventPublisher", "EventType", "PendingEvent", "encode_fields", "new_event_id"]

log = logging.getLogger(__name__)


class EventType(StrEnum):
    ACCEPTED = "accepted"
    REJECTED = "rejected"
    STAGE_SUCCEEDED = "stage_succeeded"
    STAGE_FAILED = "stage_failed"
    STAGE_SKIPPED = "stage_skipped"
    COMPLETED = "completed"
    REVIEWED = "reviewed"

    @property
    def is_answer(self) -> bool:
        """An answer to a submitter: written to the outbox, delivered at least once."""
        return self in _ANSWERS

    @property
    def fans_out(self) -> bool:
        """Also sent to the reply_to of every duplicate submission of the job."""
        return self in (EventType.COMPLETED, EventType.REVIEWED)


_ANSWERS = frozenset(
    {EventType.ACCEPTED, EventType.REJECTED, EventType.COMPLETED, EventType.REVIEWED}
)


def new_event_id() -> str:
    return uuid.uuid4().hex


@dataclass(frozen=True)
class PendingEvent:
    """An event decided inside a transaction, published after it commits."""

    event: EventType
    job_id: str
    idempotency_key: str | None = None
    reply_to: str | None = None
    fields: Mapping[str, Any] = field(default_factory=dict)
    also_to: tuple[str, ...] = ()
    """More reply_to streams (duplicate submissions of the job)."""
    on_events_stream: bool = True
    """False for an answer meant only for reply_to (a duplicate's replayed final event)."""
    event_id: str = field(default_factory=new_event_id)
    at: float = field(default_factory=time.time)

    def streams(self) -> list[str]:
        """Where the event goes: ``imgpipe:events`` and each distinct reply_to."""
        targets = [EVENTS_STREAM] if self.on_events_stream else []
        for name in (self.reply_to, *self.also_to):
            if name and name not in targets:
                targets.append(name)
        return targets

    def entry(self) -> dict[str, str]:
        return encode_fields(
            {
                "event": str(self.event),
                "event_id": self.event_id,
                "job_id": self.job_id,
                "idempotency_key": self.idempotency_key,
                "at": self.at,
                **self.fields,
            }
        )


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

    def publish_events(self, events: Sequence[PendingEvent]) -> bool:
        """Append events to their streams in one round trip; False if Redis was
        unreachable (logged: answers stay in the outbox, progress events are dropped)."""
        return self.publish_entries([(e.streams(), e.entry()) for e in events])

    def publish_entries(self, entries: Sequence[tuple[Sequence[str], Mapping[str, str]]]) -> bool:
        """XADD each ``(streams, fields)`` to every stream of it in one pipeline."""
        if not entries:
            return True
        try:
            pipe = self.client.pipeline(transaction=False)
            for streams, fields in entries:
                for stream in streams:
                    pipe.xadd(stream, dict(fields), maxlen=self.maxlen, approximate=True)  # type: ignore[arg-type]
            pipe.execute()
        except (redis.RedisError, OSError) as exc:
            first = entries[0][1]
            log.warning(
                "%d event(s) (first: %s for job %s) not published: %s",
                len(entries), first.get("event"), first.get("job_id"), exc,
            )  # fmt: skip
            return False
        return True
