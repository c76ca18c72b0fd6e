"""The reaper: SQL notices what the broker lost.

Runs periodically on the control queue (``imgpipe.reap``). It
- re-dispatches stage runs stuck in ``running`` past their deadline (worker killed or
  hung) or in ``dispatched`` with nothing left in their queue (message dropped, refused,
  or lost in a broker restart) — a queue backlog only postpones the check;
- marks them ``dead`` once they used up ``max_attempts`` runs or ``max_dispatches``
  dispatches, and advances the job so it fails with the reason;
- advances jobs that are not terminal but have nothing in flight (an ``advance``
  message that was lost);
- first of all, relays outbox rows left undelivered (orchestrator/relay.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta

import redis
from sqlalchemy import exists, select

from db.dag import mark_dispatched
from db.engine import session_scope
from db.models import Job, StageRun, utcnow
from db.repo import lock_job, lock_stage_run
from imgpipe.aftercommit import AfterCommit, Dispatch
from imgpipe.contracts import JobStatus, StageStatus
from orchestrator.advance import advance_job, deliver_after_commit
from orchestrator.context import OrchestratorContext
from orchestrator.relay import relay_outbox

__all__ = ["ReapReport", "reap"]

log = logging.getLogger(__name__)

REAP_BATCH = 500
_IN_FLIGHT = (StageStatus.DISPATCHED, StageStatus.RUNNING)


@dataclass
class ReapReport:
    redispatched: int = 0
    dead: int = 0
    advanced: int = 0


def _reap_stage(
    ctx: OrchestratorContext, job_id: str, stage_run_id: int, backlog: QueueDepths
) -> str | None:
    """Handle one overdue stage run under the job lock; returns what was done.

    - ``running`` past its deadline: the worker died or hung mid-stage. Re-dispatch (the
      next claim counts another attempt) or, with ``max_attempts`` used, ``dead``.
    - ``dispatched`` past its deadline: nobody claimed the message. If its queue still
      holds messages, the stage is waiting behind a backlog: postpone. Otherwise the
      message was lost (broker restart, refused message): re-dispatch, until
      ``max_dispatches`` re-dispatches made it ``dead``.
    """
    now = utcnow()
    dispatches: list[Dispatch] = []
    action: str | None = None
    settings = ctx.settings
    with session_scope(ctx.database_url) as session:
        job = lock_job(session, job_id)
        if job is None or JobStatus(job.status).terminal:
            return None
        # The row itself is locked too (after the job: the lock order everyone keeps), so
        # a claim that committed a moment ago is seen, not overwritten.
        row = lock_stage_run(session, stage_run_id)
        if (
            row is None
            or row.status not in _IN_FLIGHT
            or row.deadline_at is None
            or row.deadline_at > now
        ):
            return None  # someone else moved it on
        if row.status == StageStatus.RUNNING:
            exhausted = row.attempts >= row.max_attempts
            why = f"it ran {row.attempts} time(s) and never finished (worker killed or hung)"
        else:
            if backlog.depth(row.queue) > 0:
                row.deadline_at = now + timedelta(seconds=settings.dispatch_timeout_s)
                return "postponed"
            exhausted = row.dispatch_count >= settings.max_dispatches
            why = f"it was dispatched {row.dispatch_count} time(s) and no worker claimed it"
        if exhausted:
            error = f"no result: {why}; check the {row.queue} workers and their logs"
            row.status = StageStatus.DEAD
            row.finished_at = now
            row.error = error
            row.error_history = [*row.error_history, {"at": now.isoformat(), "error": error}]
            action = "dead"
        else:
            log.warning(
                "reaper: stage %s of job %s %s past %s; re-dispatching",
                row.stage, job_id, row.status, row.deadline_at,
            )  # fmt: skip
            dispatches.append(mark_dispatched(row, now, settings.dispatch_timeout_s))
            action = "redispatched"
    deliver_after_commit(ctx, AfterCommit(dispatches=dispatches))
    if action == "dead":
        advance_job(ctx, job_id)
    return action


class QueueDepths:
    """Messages waiting in each broker queue, read once per reaper pass (Redis LLEN)."""

    def __init__(self, ctx: OrchestratorContext) -> None:
        self.ctx = ctx
        self._depths: dict[str, int] = {}

    def depth(self, queue: str) -> int:
        if queue not in self._depths:
            try:
                self._depths[queue] = int(self.ctx.broker_redis.llen(queue))
            except (redis.RedisError, OSError) as exc:
                log.warning("reaper: cannot read the length of %s: %s", queue, exc)
                self._depths[queue] = 0
        return self._depths[queue]


def reap(ctx: OrchestratorContext) -> ReapReport:
    relay_outbox(ctx)
    report = ReapReport()
    now = utcnow()
    with session_scope(ctx.database_url) as session:
        overdue = session.execute(
            select(StageRun.job_id, StageRun.id)
            .where(StageRun.status.in_(list(_IN_FLIGHT)), StageRun.deadline_at < now)
            .limit(REAP_BATCH)
        ).all()
        in_flight = exists().where(StageRun.job_id == Job.id, StageRun.status.in_(list(_IN_FLIGHT)))
        idle_jobs = (
            session.execute(
                select(Job.id)
                .where(Job.status.in_([JobStatus.QUEUED, JobStatus.RUNNING]), ~in_flight)
                .limit(REAP_BATCH)
            )
            .scalars()
            .all()
        )
    backlog = QueueDepths(ctx)
    for job_id, stage_run_id in overdue:
        action = _reap_stage(ctx, job_id, stage_run_id, backlog)
        if action == "dead":
            report.dead += 1
        elif action == "redispatched":
            report.redispatched += 1
    for job_id in idle_jobs:
        after = advance_job(ctx, job_id)
        if after.dispatches or after.events:
            report.advanced += 1
    if report.redispatched or report.dead or report.advanced:
        log.info("reaper: %s", report)
    return report
