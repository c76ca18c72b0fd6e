"""Waiting out a database or broker outage inside a stage worker.

A stage worker that cannot reach the database (or the broker) keeps the work it holds
and tries again with bounded backoff and jitter (``imgpipe/backoff.py``) until the call
succeeds or the worker is asked to stop: a transient error never acks a message away, and
work resumes within ``outage_backoff_max_s`` of the outage's end instead of waiting for
the reaper's deadlines (minutes).

Also here: what to do after a commit whose acknowledgement was lost (the transaction may
or may not have committed): ``resend_uncertain``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Collection, Iterable
from datetime import datetime
from typing import Any, TypeVar

import kombu.exceptions
import redis
from sqlalchemy import select
from sqlalchemy.orm import Session

from db.dag import dispatch_of, mark_dispatched
from db.models import StageRun
from imgpipe.aftercommit import AfterCommit
from imgpipe.contracts import StageStatus
from imgpipe.errors import TransientError
from imgpipe.retry import Backoff, RetryPolicy
from workers.claims import WorkerIdentity

__all__ = ["OUTAGE_ERRORS", "OnceSender", "OutageWait", "resend_uncertain"]

log = logging.getLogger(__name__)

T = TypeVar("T")

OUTAGE_ERRORS: tuple[type[BaseException], ...] = (
    TransientError,  # the database (db/engine.py:session_scope) or the blob store
    kombu.exceptions.OperationalError,  # the broker, after kombu's own publish retries
    redis.ConnectionError,
    redis.TimeoutError,
    ConnectionError,
)


class OutageWait:
    """Call a function until it stops raising one of ``OUTAGE_ERRORS``.

    ``stop`` set: the last error is raised instead of waiting (the caller hands the work
    back). ``on_wait(seconds)`` is told how long each failed try and the wait after it
    took (the batching consumer moves its watchdog deadline by that much)."""

    def __init__(
        self,
        policy: RetryPolicy,
        stop: threading.Event | None = None,
        on_wait: Callable[[float], None] | None = None,
    ) -> None:
        self.policy = policy
        self.stop = stop or threading.Event()
        self.on_wait = on_wait

    def call(self, what: str, fn: Callable[[], T]) -> T:
        backoff = Backoff(self.policy)
        first_failure: float | None = None
        while True:
            started = time.monotonic()
            try:
                result = fn()
            except OUTAGE_ERRORS as exc:
                if self.stop.is_set():
                    raise
                delay_s = backoff.next_s()
                if first_failure is None:
                    first_failure = started
                log.warning(
                    "%s failed (try %d): %s; trying again in %.1f s",
                    what, backoff.failures, _one_line(exc), delay_s,
                )  # fmt: skip
                if self.on_wait is not None:
                    self.on_wait(time.monotonic() - started + delay_s)
                self.stop.wait(delay_s)
                continue
            if first_failure is not None:
                log.warning(
                    "%s succeeded after %d failed tries (%.1f s)",
                    what, backoff.failures, time.monotonic() - first_failure,
                )  # fmt: skip
            return result


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


class OnceSender:
    """A ``TaskSender`` that sends each message once across retries of one ``deliver``:
    a delivery retried after a broker error does not re-send what already went out."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self._sent: set[tuple[str, tuple[Any, ...], str | None]] = set()

    def send_task(self, name: str, args: Any = (), **options: Any) -> Any:
        key = (name, tuple(args), options.get("queue"))
        if key in self._sent:
            return None
        result = self.app.send_task(name, args=args, **options)
        self._sent.add(key)
        return result


def resend_uncertain(
    session: Session,
    job_ids: Collection[str],
    me: WorkerIdentity,
    skip_ids: Iterable[int],
    now: datetime,
    dispatch_timeout_s: int,
) -> AfterCommit:
    """After a transaction whose commit may have happened without our knowing (its
    connection died during COMMIT): what it would have sent is lost, so send it now.

    - every ``dispatched`` stage row of ``job_ids`` gets its message (again): a message too
      many is harmless (one claim wins, the others see it running or finished);
    - a row this process claimed for itself in that commit (``running`` here with a
      ``local-`` task id, not being run) goes back to ``dispatched`` with its attempt
      returned, and gets its message.

    ``skip_ids``: rows the caller sends or runs itself (its own dispatches and local claims).
    """
    after = AfterCommit()
    queued = set(skip_ids)
    rows = session.execute(
        select(StageRun)
        .where(StageRun.job_id.in_(sorted(job_ids)))
        .order_by(StageRun.id)
        .with_for_update()
    ).scalars()
    for row in rows:
        if row.id in queued:
            continue
        if row.status == StageStatus.DISPATCHED:
            after.dispatches.append(dispatch_of(row))
        elif (
            row.status == StageStatus.RUNNING
            and row.worker_pid == me.pid
            and row.worker_host == me.host
            and (row.celery_task_id or "").startswith("local-")
        ):
            row.attempts -= 1
            after.dispatches.append(mark_dispatched(row, now, dispatch_timeout_s))
    return after
