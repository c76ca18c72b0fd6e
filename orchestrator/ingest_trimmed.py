"""Submit-stream entries trimmed (``MAXLEN``) before any consumer read them: detected
and reported, not lost unnoticed.

Redis 7 keeps a consumer group's ``lag`` (entries added minus entries the group read).
Entries trimmed before the group read them are never read, so once the group has caught
up (a read returned fewer entries than it asked for: nothing undelivered is left) its
``lag`` is exactly the number of entries ever lost that way. ``TrimWatch.read`` makes
that read and the ``XINFO GROUPS`` in one MULTI/EXEC, and reports the growth of that
number since the last report (a compare-and-set in Redis, so that several consumers
report each loss once): a log line, the counter ``imgpipe:submit:trimmed_unread`` and an
``entries_trimmed`` event on ``imgpipe:events``. The ``lag`` is unknown while deleted
entries (``XDEL``) lie ahead of the group, and on Redis 6.2 (no ``lag``): nothing is
reported then (a warning says so once).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import redis

from imgpipe.contracts import EVENTS_STREAM, SUBMIT_GROUP, SUBMIT_STREAM, SUBMIT_TRIMMED_KEY
from imgpipe.events import encode_fields

__all__ = ["TRIMMED_EVENT", "TrimWatch"]

log = logging.getLogger(__name__)

TRIMMED_EVENT = "entries_trimmed"
LAG_SEEN_KEY = "imgpipe:submit:trimmed_lag_seen"
_RAISE_SEEN = """
local seen = tonumber(redis.call('GET', KEYS[1]) or '0')
local lag = tonumber(ARGV[1])
if lag > seen then
  redis.call('SET', KEYS[1], lag)
  redis.call('INCRBY', KEYS[2], lag - seen)
  return lag - seen
end
if lag < seen then redis.call('SET', KEYS[1], lag) end
return 0
"""


class TrimWatch:
    def __init__(self, client: redis.Redis, events_maxlen: int) -> None:
        self.client = client
        self.events_maxlen = events_maxlen
        self._raise_seen = client.register_script(_RAISE_SEEN)
        self._warned = False

    def read(self, consumer: str, count: int) -> list[Any]:
        """``XREADGROUP`` without blocking (the new entries, as redis-py returns them),
        checking for entries trimmed unread when the read caught up."""
        pipe = self.client.pipeline(transaction=True)
        pipe.xreadgroup(SUBMIT_GROUP, consumer, {SUBMIT_STREAM: ">"}, count=count)
        pipe.xinfo_groups(SUBMIT_STREAM)
        response, groups = pipe.execute()
        streams: list[Any] = list(response or [])
        read = sum(len(items) for _stream, items in streams)
        if read < count:
            self._check(groups)
        return streams

    def _check(self, groups: list[dict[str, Any]]) -> None:
        group = next(
            (g for g in groups if g["name"] in (SUBMIT_GROUP, SUBMIT_GROUP.encode())), None
        )
        if group is None:
            return
        if "lag" not in group:
            if not self._warned:
                log.warning(
                    "ingest: this Redis reports no consumer-group lag (Redis < 7): entries "
                    "trimmed from %s before they were read cannot be detected; watch XLEN",
                    SUBMIT_STREAM,
                )
                self._warned = True
            return
        lag = group["lag"]
        if lag is None:
            return  # deleted entries ahead of the group: unknown until it passes them
        lost = int(self._raise_seen(keys=[LAG_SEEN_KEY, SUBMIT_TRIMMED_KEY], args=[int(lag)]))
        if lost > 0:
            self._report(lost)

    def _report(self, lost: int) -> None:
        total = int(self.client.get(SUBMIT_TRIMMED_KEY) or 0)
        message = (
            f"{lost} entries were trimmed from {SUBMIT_STREAM} (MAXLEN) before any consumer "
            f"read them ({total} so far); their submitters got no answer and must submit "
            "again. Raise IMGPIPE_SUBMIT_MAXLEN and the producers' MAXLEN, or add consumers"
        )
        log.error("ingest: %s", message)
        event = encode_fields(
            {"event": TRIMMED_EVENT, "job_id": None, "idempotency_key": None,
             "count": lost, "total": total, "error": message, "at": time.time()}
        )  # fmt: skip
        self.client.xadd(EVENTS_STREAM, event, maxlen=self.events_maxlen, approximate=True)  # type: ignore[arg-type]
