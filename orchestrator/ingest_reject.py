"""What the submit consumer (orchestrator/ingest.py) queues when it gives up on an entry.

Both go into the consumer's MULTI/EXEC pipeline, with the entry's ``XACK``:

- ``queue_rejection``: the ``rejected`` event, on ``imgpipe:events`` and on the entry's
  ``reply_to`` if it named one;
- ``queue_dead_letter``: for an entry delivered more than ``ingest_max_deliveries`` times,
  a copy on ``imgpipe:submit:dead`` (its image parked in the blob store,
  orchestrator/ingest_dead.py) with the last error, then its ``dead_lettered`` rejection.
"""

from __future__ import annotations

import logging
import time

import redis

from imgpipe.contracts import EVENTS_STREAM, SUBMIT_DEAD_STREAM, SUBMIT_FAILURES_KEY
from imgpipe.events import EventType, encode_fields
from orchestrator.context import OrchestratorContext
from orchestrator.ingest_dead import dead_letter_fields
from orchestrator.ingest_entry import routing_of
from orchestrator.ingest_types import StreamEntry, as_text

__all__ = ["DEAD_FIELD_PREFIX", "queue_dead_letter", "queue_rejection"]

log = logging.getLogger(__name__)

DEAD_FIELD_PREFIX = "_dead_"


def queue_rejection(
    pipe: redis.client.Pipeline,
    entry_id: str,
    idempotency_key: str | None,
    reply_to: str | None,
    code: str,
    message: str,
    *,
    maxlen: int,
) -> None:
    event = encode_fields(
        {
            "event": str(EventType.REJECTED),
            "job_id": None,
            "idempotency_key": idempotency_key or f"stream:{entry_id}",
            "entry_id": entry_id,
            "reason": code,
            "error": message,
            "at": time.time(),
        }
    )
    pipe.xadd(EVENTS_STREAM, event, maxlen=maxlen, approximate=True)  # type: ignore[arg-type]
    if reply_to:
        pipe.xadd(reply_to, event, maxlen=maxlen, approximate=True)  # type: ignore[arg-type]


def queue_dead_letter(
    pipe: redis.client.Pipeline,
    client: redis.Redis,
    ctx: OrchestratorContext,
    entry: StreamEntry,
) -> None:
    last_error = client.hget(SUBMIT_FAILURES_KEY, entry.entry_id)
    reason = (
        as_text(last_error)
        if last_error
        else "never acknowledged (the consumer handling it crashed each time)"
    )
    message = (
        f"gave up after {entry.deliveries - 1} deliveries; last error: {reason}. The entry "
        f"is kept in {SUBMIT_DEAD_STREAM}; fix the cause and submit it again"
    )
    log.error("ingest: entry %s dead-lettered: %s", entry.entry_id, message)
    dead: dict[str | bytes, bytes | str] = dict(
        dead_letter_fields(ctx.blobs, entry.entry_id, entry.fields).items()
    )
    dead.update(
        {
            f"{DEAD_FIELD_PREFIX}entry_id": entry.entry_id,
            f"{DEAD_FIELD_PREFIX}reason": reason,
            f"{DEAD_FIELD_PREFIX}deliveries": str(entry.deliveries - 1),
            f"{DEAD_FIELD_PREFIX}at": str(time.time()),
        }
    )
    pipe.xadd(
        SUBMIT_DEAD_STREAM,
        dead,  # type: ignore[arg-type]
        maxlen=ctx.settings.submit_maxlen,
        approximate=True,
    )
    key, reply_to = routing_of(entry.fields, ctx.settings.reply_to_prefix)
    queue_rejection(
        pipe, entry.entry_id, key, reply_to, "dead_lettered", message,
        maxlen=ctx.settings.events_maxlen,
    )  # fmt: skip
