"""The reaper: SQL notices what the broker lost.

Runs periodically on the control queue (``imgpipe.reap``). It
- re-dispatches stage runs stuck in ``dispatched`` or ``running`` past their deadline
  (message dropped, worker killed, broker restarted without the message);
- marks them ``dead`` once they used up ``max_attempts`` runs or dispatches, and
  advances the job so it fails with the reason;
- advances jobs that are not terminal but have nothing in flight (an ``advance``
  message that was lost).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from sqlalchemy import exists, select

from db.engine import session_scope
from db.models import Job, StageRun, utcnow
from db.repo import lock_job
from imgpipe.contracts import JobStatus, StageStatus
from orchestrator.advance import Dispatch, advance_job, mark_dispatched, send_dispatches
from orchestrator.context import OrchestratorContext

__all__ = ["ReapReport", "reap"]

log = logging.getLogger(__name__)

REAP_BATCH = 500
_IN_FLIGHT = (StageStatus.DISPATCHED, StageStatus.RUNNING)


@dataclass
class ReapReport:
    redispatched: int = 0
    dead: int = 0
    advanced: int = 0


def _reap_stage(ctx: OrchestratorContext, job_id: str, stage_run_id: int) -> str | None:
    """Handle one overdue stage run under the job lock; returns what was done."""
    now = utcnow()
    dispatches: list[Dispatch] = []
    action: str | None = None
    with session_scope(ctx.database_url) as session:
        job = lock_job(session, job_id)
        if job is None or JobStatus(job.status).terminal:
            return None
        row = next((r for r in job.stage_runs if r.id == stage_run_id), None)
        if (
            row is None
            or row.status not in _IN_FLIGHT
            or row.deadline_at is None
            or row.deadline_at > now
        ):
            return None  # someone else moved it on
        exhausted = row.attempts >= row.max_attempts or row.dispatch_count >= row.max_attempts
        if exhausted:
            row.status = StageStatus.DEAD
            row.finished_at = now
            row.error = (
                f"no result after {row.attempts} run(s) and {row.dispatch_count} dispatch(es) "
                f"(state {row.status} past its deadline each time); check the "
                f"{row.queue} workers' logs"
            )
            row.error_history = [*row.error_history, {"at": now.isoformat(), "error": row.error}]
            action = "dead"
        else:
            log.warning(
                "reaper: stage %s of job %s stuck in %s past %s; re-dispatching",
                row.stage,
                job_id,
                row.status,
                row.deadline_at,
            )
            dispatches.append(mark_dispatched(row, now, ctx.settings.dispatch_grace_s))
            action = "redispatched"
    send_dispatches(ctx, dispatches)
    if action == "dead":
        advance_job(ctx, job_id)
    return action


def reap(ctx: OrchestratorContext) -> ReapReport:
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
    for job_id, stage_run_id in overdue:
        action = _reap_stage(ctx, job_id, stage_run_id)
        if action == "dead":
            report.dead += 1
        elif action == "redispatched":
            report.redispatched += 1
    for job_id in idle_jobs:
        outcome = advance_job(ctx, job_id)
        if outcome.dispatches or outcome.completed is not None:
            report.advanced += 1
    if report.redispatched or report.dead or report.advanced:
        log.info("reaper: %s", report)
    return report
