"""Re-sending a job's lost stage messages when its submission comes again.

A submission's transaction can commit while its caller sees an error: the database
connection died during COMMIT, or the broker refused the stage messages after it. The
caller tries again (the submit stream's consumer and the Celery task do so by
themselves), finds its idempotency key taken and gets the existing job back, and the
messages the first try never sent would be re-sent only at the reaper's dispatch
deadline (``dispatch_timeout_s``, 5 minutes by default).

So a duplicate submission of a job still in flight re-sends the message of each of the
job's stage rows that has been ``dispatched`` for at least ``RESEND_AFTER_S`` without a
claim. A message too many is harmless (one claim wins; the others find the row running
or finished). The row's ``dispatched_at`` moves to the re-send, so however many
duplicates arrive, a row gets at most one extra message per ``RESEND_AFTER_S``; its
``dispatch_count`` and reaper deadline are left alone. Best effort: when the database or
the broker is unreachable the duplicate is still answered, and the reaper stays the
backstop. So does it for a retry that comes less than ``RESEND_AFTER_S`` after the lost
commit (a single dropped connection, retried at once): the wait keeps a duplicate that
races its original's sends from doubling them.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from datetime import timedelta

import kombu.exceptions
import redis
from sqlalchemy import select

from db.dag import dispatch_of
from db.engine import session_scope
from db.models import StageRun, utcnow
from db.repo import lock_jobs
from imgpipe.aftercommit import AfterCommit
from imgpipe.contracts import JobStatus, StageStatus
from imgpipe.errors import TransientError
from orchestrator.advance import deliver_after_commit
from orchestrator.context import OrchestratorContext

__all__ = ["RESEND_AFTER_S", "resend_unclaimed"]

log = logging.getLogger(__name__)

RESEND_AFTER_S = 1.0
"""How long a stage row must have waited unclaimed since its last message before a
duplicate submission sends it another."""


def resend_unclaimed(ctx: OrchestratorContext, job_ids: Collection[str]) -> int:
    """Re-send the messages of the unclaimed stage rows of ``job_ids`` (module
    docstring); returns how many were sent. Never raises for an outage."""
    if not job_ids:
        return 0
    try:
        after = _mark_resent(ctx, job_ids)
        if after.dispatches:
            deliver_after_commit(ctx, after)
    except (TransientError, kombu.exceptions.OperationalError, redis.RedisError, OSError) as exc:
        log.warning(
            "duplicate submission of job(s) %s: their unclaimed stage messages were not "
            "re-sent (%s); the reaper re-sends them at their dispatch deadline",
            ", ".join(sorted(job_ids)), exc,
        )  # fmt: skip
        return 0
    for d in after.dispatches:
        log.warning(
            "stage run %s waited over %.0f s unclaimed and its job was submitted again: "
            "its message is re-sent to %s (the first may have been lost)",
            d.stage_run_id, RESEND_AFTER_S, d.queue,
        )  # fmt: skip
    return len(after.dispatches)


def _mark_resent(ctx: OrchestratorContext, job_ids: Collection[str]) -> AfterCommit:
    """One transaction: the jobs locked (the order every job-locking transaction keeps),
    then their unclaimed rows, each stamped with the re-send time."""
    now = utcnow()
    after = AfterCommit()
    with session_scope(ctx.database_url) as session:
        jobs = lock_jobs(session, job_ids)
        live = [job_id for job_id, job in jobs.items() if not JobStatus(job.status).terminal]
        if not live:
            return after
        rows = session.execute(
            select(StageRun)
            .where(
                StageRun.job_id.in_(sorted(live)),
                StageRun.status == StageStatus.DISPATCHED,
                StageRun.dispatched_at <= now - timedelta(seconds=RESEND_AFTER_S),
            )
            .order_by(StageRun.id)
            .with_for_update()
        ).scalars()
        for row in rows:
            row.dispatched_at = now
            after.dispatches.append(dispatch_of(row))
    return after
