"""The submit stream consumer: other services submit through Redis (docs/submitting.md).

``SubmitConsumer`` reads ``imgpipe:submit`` through the consumer group ``imgpipe`` with
``XREADGROUP COUNT ingest_batch BLOCK ingest_block_ms`` and turns each entry into exactly
one job or one ``rejected`` event. The entries of one read are parsed, then submitted
together (``orchestrator.submit.submit_many``: one transaction for the batch):

- An entry is acknowledged only after its job row has committed. A consumer killed in
  between leaves the entry pending; ``XAUTOCLAIM`` hands it to a live consumer after
  ``ingest_claim_idle_ms``. An entry without an ``idempotency_key`` gets the key
  ``stream:<entry id>``, so a redelivered entry finds its job instead of making another.
- Malformed entries are rejected at once: the ``rejected`` event (on ``imgpipe:events``
  and the entry's ``reply_to``) and the ``XACK`` go out in one MULTI/EXEC transaction,
  so a crash cannot publish a rejection without acknowledging it or the reverse.
- While the database is unreachable the consumer pauses: an entry that failed with a
  transient error while a probe (``SELECT 1``) fails is held in memory, not counted as a
  failure; no new entries are read; the held entries' claim is renewed (``XCLAIM
  JUSTID``: idle time reset, delivery count unchanged) so no other consumer takes them;
  the probe is retried with bounded backoff and jitter, and once it succeeds the held
  entries are handled and reading resumes. An outage of any length dead-letters nothing.
- Entries that keep failing for other reasons (a bug, a transient error while the
  database answers) are processed at most ``ingest_max_deliveries`` times (XPENDING's
  delivery count), then moved to ``imgpipe:submit:dead`` with the last error and rejected
  with reason ``dead_lettered``.
- Acknowledged entries are trimmed (``XTRIM MINID ~``): image bytes do not pile up.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

import redis
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from db.engine import session_scope
from imgpipe.backoff import Backoff
from imgpipe.contracts import (
    EVENTS_STREAM,
    SUBMIT_DEAD_STREAM,
    SUBMIT_FAILURES_KEY,
    SUBMIT_GROUP,
    SUBMIT_STREAM,
)
from imgpipe.errors import PermanentError, TransientError
from imgpipe.events import EventType, encode_fields
from orchestrator.context import OrchestratorContext
from orchestrator.ingest_dead import dead_letter_fields
from orchestrator.ingest_entry import parse_entry, rejection_code, routing_of
from orchestrator.ingest_trimmed import TrimWatch
from orchestrator.submit import SubmitRequest, submit_many

__all__ = ["PollReport", "SubmitConsumer", "default_consumer_name"]

log = logging.getLogger(__name__)

HOUSEKEEPING_INTERVAL_S = 30.0
DEAD_FIELD_PREFIX = "_dead_"


def default_consumer_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclass
class PollReport:
    """What one ``poll_once`` did, entry by entry."""

    read: int = 0
    reclaimed: int = 0
    jobs: int = 0
    """Entries that ended as a job (new, a cache hit, or a rejected image)."""
    duplicates: int = 0
    """Of ``jobs``: the idempotency key matched an existing job."""
    rejected: int = 0
    """Malformed entries: a ``rejected`` event, no job."""
    dead: int = 0
    retrying: int = 0
    """Failed transiently; left pending for a later delivery."""
    held: int = 0
    """Failed while the database is unreachable: held by this consumer until it is back."""
    paused: bool = False
    """The database is unreachable: nothing new was read."""


@dataclass(frozen=True)
class _Entry:
    entry_id: str
    fields: dict[bytes, bytes]
    deliveries: int


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class SubmitConsumer:
    """One consumer of the submit group. Run several (any hosts) to scale out."""

    def __init__(
        self,
        ctx: OrchestratorContext,
        consumer: str | None = None,
        client: redis.Redis | None = None,
    ) -> None:
        self.ctx = ctx
        self.settings = ctx.settings
        self.name = consumer or default_consumer_name()
        self.client = client or redis.Redis.from_url(
            self.settings.effective_redis_url,
            socket_timeout=self.settings.ingest_block_ms / 1000 + 10,
            socket_connect_timeout=5,
        )
        self._trim_watch = TrimWatch(self.client, self.settings.events_maxlen)
        self._group_ready = False
        self._claim_cursor = "0-0"
        self._last_housekeeping = 0.0
        self._held: list[_Entry] = []
        """Entries waiting for the database to come back (see the module's docstring)."""

    # -- the loop -------------------------------------------------------------------------
    def run_forever(self, stop_event: threading.Event) -> None:
        """Poll until ``stop_event`` is set; Redis or database outages are waited out."""
        log.info("ingest consumer %s reading %s", self.name, SUBMIT_STREAM)
        backoff = Backoff(self.settings.outage_backoff_s, self.settings.outage_backoff_max_s)
        while not stop_event.is_set():
            try:
                report = self.poll_once()
            except (redis.ConnectionError, redis.TimeoutError, OSError, TransientError) as exc:
                delay_s = backoff.next_s()
                log.warning("ingest: %s; retrying in %.1f s", exc, delay_s)
                stop_event.wait(delay_s)
                continue
            if report.read or report.reclaimed:
                log.info("ingest: %s", report)
            if report.paused:
                stop_event.wait(backoff.next_s())
                continue
            backoff.reset()

    def ensure_group(self) -> None:
        """Create the group (at id 0: entries added before any consumer ran are read),
        with ENTRIESREAD 0 on Redis 7 so that its lag counts entries trimmed before the
        first read too (orchestrator/ingest_trimmed.py); Redis 6.2 has no such option."""
        for entries_read in (0, None):
            try:
                self.client.xgroup_create(
                    SUBMIT_STREAM, SUBMIT_GROUP, id="0", mkstream=True, entries_read=entries_read
                )
            except redis.ResponseError as exc:
                if "BUSYGROUP" in str(exc):
                    break
                if entries_read is not None:  # Redis 6.2: no ENTRIESREAD
                    continue
                raise
            break
        self._group_ready = True

    def poll_once(self, block_ms: int | None = None) -> PollReport:
        """Reclaim idle pending entries, else read new ones (blocking), and handle them."""
        report = PollReport()
        if not self._group_ready:
            self.ensure_group()
        if self._held:
            self._retry_held(report)
            return report
        try:
            entries = self._reclaim()
            report.reclaimed = len(entries)
            if not entries:
                entries = self._read_new(
                    self.settings.ingest_block_ms if block_ms is None else block_ms
                )
                report.read = len(entries)
        except redis.ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            log.warning("ingest: consumer group gone (stream deleted?); recreating it")
            self._group_ready = False
            return report
        if entries:
            self._handle(entries, report)
        if time.monotonic() - self._last_housekeeping > HOUSEKEEPING_INTERVAL_S:
            self.housekeeping()
        return report

    # -- reading --------------------------------------------------------------------------
    def _read_new(self, block_ms: int) -> list[_Entry]:
        # First without blocking, with the check for entries trimmed unread
        # (orchestrator/ingest_trimmed.py); then, if there was nothing, blocking.
        streams: list[Any] = self._trim_watch.read(self.name, self.settings.ingest_batch)
        if not streams and block_ms > 0:
            response = self.client.xreadgroup(
                SUBMIT_GROUP,
                self.name,
                {SUBMIT_STREAM: ">"},
                count=self.settings.ingest_batch,
                block=block_ms,
            )
            streams = list(response or [])
        return [
            _Entry(_text(entry_id), dict(fields), 1)
            for _stream, items in streams
            for entry_id, fields in items
        ]

    def _reclaim(self) -> list[_Entry]:
        """Entries pending longer than ``ingest_claim_idle_ms`` (any consumer), with counts."""
        response = self.client.xautoclaim(
            SUBMIT_STREAM,
            SUBMIT_GROUP,
            self.name,
            min_idle_time=self.settings.ingest_claim_idle_ms,
            start_id=self._claim_cursor,
            count=self.settings.ingest_batch,
        )
        self._claim_cursor = _text(response[0])
        claimed = [(_text(i), f) for i, f in response[1] if i is not None]
        # Entries trimmed before anyone handled them: Redis 7 lists their ids in a third
        # element (already out of the PEL); Redis 6.2 returns them as nil entries.
        trimmed = [_text(i) for i in response[2]] if len(response) > 2 else []
        if any(i is None for i, _ in response[1]):
            trimmed += self._trimmed_pending()
        if trimmed:
            self._reject_trimmed(trimmed)
        if not claimed:
            return []
        pipe = self.client.pipeline(transaction=False)
        for entry_id, _ in claimed:
            pipe.xpending_range(SUBMIT_STREAM, SUBMIT_GROUP, entry_id, entry_id, 1)
        counts = {}
        for rows in pipe.execute():
            for row in rows:
                counts[_text(row["message_id"])] = int(row["times_delivered"])
        log.warning("ingest: reclaimed %d idle pending entries", len(claimed))
        return [_Entry(i, dict(f), counts.get(i, 2)) for i, f in claimed]

    def _trimmed_pending(self) -> list[str]:
        rows = self.client.xpending_range(
            SUBMIT_STREAM, SUBMIT_GROUP, "-", "+", 1000, consumername=self.name
        )
        ids = [_text(row["message_id"]) for row in rows]
        return [i for i in ids if not self.client.xrange(SUBMIT_STREAM, i, i)]

    def _reject_trimmed(self, entry_ids: list[str]) -> None:
        pipe = self.client.pipeline(transaction=True)
        for entry_id in entry_ids:
            log.error("ingest: entry %s was trimmed before it was handled", entry_id)
            self._queue_rejection(
                pipe, entry_id, None, None, "entry_trimmed",
                f"entry {entry_id} was trimmed from {SUBMIT_STREAM} (MAXLEN) before imgpipe "
                "handled it; submit it again, and raise the MAXLEN cap or add consumers",
            )  # fmt: skip
            pipe.xack(SUBMIT_STREAM, SUBMIT_GROUP, entry_id)
        pipe.execute()

    # -- a database outage -----------------------------------------------------------------
    def database_reachable(self) -> bool:
        """One ``SELECT 1``: can submissions be committed right now?"""
        try:
            with session_scope(self.ctx.database_url) as session:
                session.execute(text("SELECT 1"))
        except (TransientError, DBAPIError, OSError):
            return False
        return True

    def _retry_held(self, report: PollReport) -> None:
        """Paused: handle the held entries once the database answers, else keep them."""
        if not self.database_reachable():
            self._renew_hold()
            report.paused = True
            report.held = len(self._held)
            return
        entries, self._held = self._held, []
        log.warning(
            "ingest: the database answers again; handling the %d held entries, then reading "
            "new ones", len(entries),
        )  # fmt: skip
        self._handle(entries, report)

    def _renew_hold(self) -> None:
        """Reset the held entries' idle time (no other consumer reclaims them) without
        counting a delivery (JUSTID); drop any that are no longer pending here."""
        ids: list[Any] = [e.entry_id for e in self._held]
        kept = self.client.xclaim(SUBMIT_STREAM, SUBMIT_GROUP, self.name, 0, ids, justid=True)
        still = {_text(i) for i in kept}
        self._held = [e for e in self._held if e.entry_id in still]

    def _hold(self, entries: list[tuple[_Entry, Exception]], report: PollReport) -> bool:
        """Entries that failed transiently: held if the database is unreachable (True)."""
        if not entries or self.database_reachable():
            return False
        self._held.extend(entry for entry, _ in entries)
        report.held = len(self._held)
        report.paused = True
        log.warning(
            "ingest: the database is unreachable (%s); pausing: %d entries held, no new "
            "entries read until it answers", entries[0][1], len(self._held),
        )  # fmt: skip
        return True

    # -- handling -------------------------------------------------------------------------
    def _handle(self, entries: list[_Entry], report: PollReport) -> None:
        """Parse every entry, submit the valid ones as one batch (``submit_many``: one
        transaction), then one Redis transaction acks, rejects and dead-letters."""
        finish = self.client.pipeline(transaction=True)
        done: list[str] = []
        parsed: list[tuple[_Entry, SubmitRequest]] = []
        transient: list[tuple[_Entry, Exception]] = []
        for entry in entries:
            if entry.deliveries > self.settings.ingest_max_deliveries:
                self._dead_letter(finish, entry)
                done.append(entry.entry_id)
                report.dead += 1
                continue
            try:
                parsed.append((entry, parse_entry(self.ctx, entry.entry_id, entry.fields)))
            except TransientError as exc:
                transient.append((entry, exc))
            except Exception as exc:
                if self._failed(finish, entry, exc, report):
                    done.append(entry.entry_id)
        if parsed:
            try:
                results = submit_many(self.ctx, [request for _, request in parsed])
            except Exception as exc:  # nothing of the batch committed
                results = [exc] * len(parsed)
            for (entry, _request), result in zip(parsed, results, strict=True):
                if isinstance(result, TransientError):
                    transient.append((entry, result))
                    continue
                if isinstance(result, Exception):
                    if self._failed(finish, entry, result, report):
                        done.append(entry.entry_id)
                    continue
                done.append(entry.entry_id)
                report.jobs += 1
                if not result.created:  # answered by submit_many (orchestrator/duplicates.py)
                    report.duplicates += 1
        if not self._hold(transient, report):
            for failed_entry, error in transient:
                self._failed(finish, failed_entry, error, report)
        if done:
            finish.xack(SUBMIT_STREAM, SUBMIT_GROUP, *done)
            finish.hdel(SUBMIT_FAILURES_KEY, *done)
        finish.execute()

    def _failed(
        self, pipe: redis.client.Pipeline, entry: _Entry, exc: Exception, report: PollReport
    ) -> bool:
        """Queue what an entry's error calls for; True if the entry is finished with (a
        rejection), False if it stays pending for another delivery."""
        if isinstance(exc, PermanentError):
            key, reply_to = routing_of(entry.fields, self.ctx.settings.reply_to_prefix)
            log.info("ingest: entry %s rejected: %s", entry.entry_id, exc)
            self._queue_rejection(
                pipe, entry.entry_id, key, reply_to, rejection_code(exc), str(exc)
            )
            report.rejected += 1
            return True
        transient = isinstance(exc, TransientError)
        log.log(
            logging.WARNING if transient else logging.ERROR,
            "ingest: entry %s failed (delivery %d): %s",
            entry.entry_id, entry.deliveries, exc, exc_info=None if transient else exc,
        )  # fmt: skip
        pipe.hset(SUBMIT_FAILURES_KEY, entry.entry_id, f"{type(exc).__name__}: {exc}")
        report.retrying += 1
        return False

    def _queue_rejection(
        self,
        pipe: redis.client.Pipeline,
        entry_id: str,
        idempotency_key: str | None,
        reply_to: str | None,
        code: str,
        message: str,
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
        maxlen = self.settings.events_maxlen
        pipe.xadd(EVENTS_STREAM, event, maxlen=maxlen, approximate=True)  # type: ignore[arg-type]
        if reply_to:
            pipe.xadd(reply_to, event, maxlen=maxlen, approximate=True)  # type: ignore[arg-type]

    def _dead_letter(self, pipe: redis.client.Pipeline, entry: _Entry) -> None:
        last_error = self.client.hget(SUBMIT_FAILURES_KEY, entry.entry_id)
        reason = (
            _text(last_error)
            if last_error
            else "never acknowledged (the consumer handling it crashed each time)"
        )
        message = (
            f"gave up after {entry.deliveries - 1} deliveries; last error: {reason}. The entry "
            f"is kept in {SUBMIT_DEAD_STREAM}; fix the cause and submit it again"
        )
        log.error("ingest: entry %s dead-lettered: %s", entry.entry_id, message)
        dead: dict[str | bytes, bytes | str] = dict(
            dead_letter_fields(self.ctx.blobs, entry.entry_id, entry.fields).items()
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
            maxlen=self.settings.submit_maxlen,
            approximate=True,
        )
        key, reply_to = routing_of(entry.fields, self.ctx.settings.reply_to_prefix)
        self._queue_rejection(pipe, entry.entry_id, key, reply_to, "dead_lettered", message)

    # -- housekeeping ---------------------------------------------------------------------
    def housekeeping(self) -> None:
        """Trim acknowledged entries; forget long-idle consumers that hold nothing."""
        self._last_housekeeping = time.monotonic()
        try:
            groups = {_text(g["name"]): g for g in self.client.xinfo_groups(SUBMIT_STREAM)}
        except redis.ResponseError:  # the stream was deleted; poll_once recreates it
            self._group_ready = False
            return
        group = groups.get(SUBMIT_GROUP)
        if group is None:
            return
        summary = self.client.xpending(SUBMIT_STREAM, SUBMIT_GROUP)
        if summary["pending"]:
            min_id = _text(summary["min"])
        else:
            ms, _, seq = _text(group["last-delivered-id"]).partition("-")
            min_id = f"{ms}-{int(seq or 0) + 1}"
        self.client.xtrim(SUBMIT_STREAM, minid=min_id, approximate=True)
        forget_after_ms = max(10 * self.settings.ingest_claim_idle_ms, 3_600_000)
        for consumer in self.client.xinfo_consumers(SUBMIT_STREAM, SUBMIT_GROUP):
            name = _text(consumer["name"])
            if name != self.name and not consumer["pending"] and consumer["idle"] > forget_after_ms:
                self.client.xgroup_delconsumer(SUBMIT_STREAM, SUBMIT_GROUP, name)
