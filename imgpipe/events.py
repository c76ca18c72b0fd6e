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
from collections.abc import Mapping
from enum import StrEnum
from typing import Any

import redis

from imgpipe.contracts import EVENTS_STREAM

__all__ = ["EventPublisher", "EventType", "encode_fields"]

log = logging.getLogger(__name__)


class EventType(StrEnum):
    ACCEPTED = "accepted"
    REJECTED = "rejected"
    STAGE_SUCCEEDED = "stage_succeeded"
    STAGE_FAILED = "stage_failed"
    STAGE_SKIPPED = "stage_skipped"
    COMPLETED = "completed"
    REVIEWED = "reviewed"


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
        entry = encode_fields(
            {
                "event": str(event),
                "job_id": job_id,
                "idempotency_key": idempotency_key,
                "at": time.time(),
                **fields,
            }
        )
        try:
            pipe = self.client.pipeline(transaction=False)
            pipe.xadd(EVENTS_STREAM, entry, maxlen=self.maxlen, approximate=True)  # type: ignore[arg-type]
            if reply_to:
                pipe.xadd(reply_to, entry, maxlen=self.maxlen, approximate=True)  # type: ignore[arg-type]
            results = pipe.execute()
        except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
            log.warning("event %s for job %s not published: %s", event, job_id, exc)
            return None
        stream_id = results[0]
        return stream_id.decode() if isinstance(stream_id, bytes) else str(stream_id)
