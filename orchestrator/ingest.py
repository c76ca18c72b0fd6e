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

The rejections and dead letters it queues are built in orchestrator/ingest_reject.py, its
small types (``PollReport``, ``StreamEntry``) live in orchestrator/ingest_types.py.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import redis
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from db.engine import session_scope
from imgpipe.contracts import SUBMIT_FAILURES_KEY, SUBMIT_GROUP, SUBMIT_STREAM
from imgpipe.errors import PermanentError, TransientError
from imgpipe.retry import Backoff, outage_retry_policy
from orchestrator.context import OrchestratorContext
from orchestrator.ingest_entry import parse_entry, rejection_code, routing_of
from orchestrator.ingest_reject import queue_dead_letter, queue_rejection
from orchestrator.ingest_trimmed import TrimWatch
from orchestrator.ingest_types import PollReport, StreamEntry, as_text, default_consumer_name
from orchestrator.submit import SubmitRequest, submit_many

__all__ = ["PollReport", "SubmitConsumer", "default_consumer_name"]

log = logging.getLogger(__name__)

HOUSEKEEPING_INTERVAL_S = 30.0


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
        self._held: list[StreamEntry] = []
        """Entries waiting for the database to come back (see the module's docstring)."""

    # -- the loop -------------------------------------------------------------------------
    def run_forever(self, stop_event: threading.Event) -> None:
        """Poll until ``stop_event`` is set; Redis or database outages are waited out."""
        log.info("ingest consumer %s reading %s", self.name, SUBMIT_STREAM)
        backoff = Backoff(outage_retry_policy(self.settings))
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
    def _read_new(self, block_ms: int) -> list[StreamEntry]:
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
            StreamEntry(as_text(entry_id), dict(fields), 1)
            for _stream, items in streams
            for entry_id, fields in items
        ]

    def _reclaim(self) -> list[StreamEntry]:
        """Entries pending longer than ``ingest_claim_idle_ms`` (any consumer), with counts."""
        response = self.client.xautoclaim(
            SUBMIT_STREAM,
            SUBMIT_GROUP,
            self.name,
            min_idle_time=self.settings.ingest_claim_idle_ms,
            start_id=self._claim_cursor,
            count=self.settings.ingest_batch,
        )
        self._claim_cursor = as_text(response[0])
        claimed = [(as_text(i), f) for i, f in response[1] if i is not None]
        # Entries trimmed before anyone handled them: Redis 7 lists their ids in a third
        # element (already out of the PEL); Redis 6.2 returns them as nil entries.
        trimmed = [as_text(i) for i in response[2]] if len(response) > 2 else []
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
                counts[as_text(row["message_id"])] = int(row["times_delivered"])
        log.warning("ingest: reclaimed %d idle pending entries", len(claimed))
        return [StreamEntry(i, dict(f), counts.get(i, 2)) for i, f in claimed]

    def _trimmed_pending(self) -> list[str]:
        rows = self.client.xpending_range(
            SUBMIT_STREAM, SUBMIT_GROUP, "-", "+", 1000, consumername=self.name
        )
        ids = [as_text(row["message_id"]) for row in rows]
        return [i for i in ids if not self.client.xrange(SUBMIT_STREAM, i, i)]

    def _reject_trimmed(self, entry_ids: list[str]) -> None:
        pipe = self.client.pipeline(transaction=True)
        for entry_id in entry_ids:
            log.error("ingest: entry %s was trimmed before it was handled", entry_id)
            queue_rejection(
                pipe, entry_id, None, None, "entry_trimmed",
                f"entry {entry_id} was trimmed from {SUBMIT_STREAM} (MAXLEN) before imgpipe "
                "handled it; submit it again, and raise the MAXLEN cap or add consumers",
                maxlen=self.settings.events_maxlen,
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
        still = {as_text(i) for i in kept}
        self._held = [e for e in self._held if e.entry_id in still]

    def _hold(self, entries: list[tuple[StreamEntry, Exception]], report: PollReport) -> bool:
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
    def _handle(self, entries: list[StreamEntry], report: PollReport) -> None:
        """Parse every entry, submit the valid ones as one batch (``submit_many``: one
        transaction), then one Redis transaction acks, rejects and dead-letters."""
        finish = self.client.pipeline(transaction=True)
        done: list[str] = []
        parsed: list[tuple[StreamEntry, SubmitRequest]] = []
        transient: list[tuple[StreamEntry, Exception]] = []
        for entry in entries:
            if entry.deliveries > self.settings.ingest_max_deliveries:
                queue_dead_letter(finish, self.client, self.ctx, entry)
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
        self, pipe: redis.client.Pipeline, entry: StreamEntry, exc: Exception, report: PollReport
    ) -> bool:
        """Queue what an entry's error calls for; True if the entry is finished with (a
        rejection), False if it stays pending for another delivery."""
        if isinstance(exc, PermanentError):
            key, reply_to = routing_of(entry.fields, self.ctx.settings.reply_to_prefix)
            log.info("ingest: entry %s rejected: %s", entry.entry_id, exc)
            queue_rejection(
                pipe, entry.entry_id, key, reply_to, rejection_code(exc), str(exc),
                maxlen=self.settings.events_maxlen,
            )  # fmt: skip
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

    # -- housekeeping ---------------------------------------------------------------------
    def housekeeping(self) -> None:
        """Trim acknowledged entries; forget long-idle consumers that hold nothing."""
        self._last_housekeeping = time.monotonic()
        try:
            groups = {as_text(g["name"]): g for g in self.client.xinfo_groups(SUBMIT_STREAM)}
        except redis.ResponseError:  # the stream was deleted; poll_once recreates it
            self._group_ready = False
            return
        group = groups.get(SUBMIT_GROUP)
        if group is None:
            return
        summary = self.client.xpending(SUBMIT_STREAM, SUBMIT_GROUP)
        if summary["pending"]:
            min_id = as_text(summary["min"])
        else:
            ms, _, seq = as_text(group["last-delivered-id"]).partition("-")
            min_id = f"{ms}-{int(seq or 0) + 1}"
        self.client.xtrim(SUBMIT_STREAM, minid=min_id, approximate=True)
        forget_after_ms = max(10 * self.settings.ingest_claim_idle_ms, 3_600_000)
        for consumer in self.client.xinfo_consumers(SUBMIT_STREAM, SUBMIT_GROUP):
            name = as_text(consumer["name"])
            if name != self.name and not consumer["pending"] and consumer["idle"] > forget_after_ms:
                self.client.xgroup_delconsumer(SUBMIT_STREAM, SUBMIT_GROUP, name)
