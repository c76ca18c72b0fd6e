"""The reaper: SQL notices what the broker lost.

Runs periodically on the control queue (``imgpipe.reap``). It
- re-dispatches stage runs stuck in ``running`` past their deadline (worker killed or
  hung) or in ``dispatched`` with nothing left in their queue (message dropped, refused,
  or lost in a broker restart) — a queue backlog only postpones the check, for at most
  ``reaper_postpone_max_s`` since the stage's last dispatch; past that it is re-dispatched
  anyway (a message lost behind a long backfill must not wait for hours);
- marks them ``dead`` once they used up ``max_attempts`` runs or ``max_dispatches``
  dispatches, and advances the job so it fails with the reason;
- advances jobs that are not terminal but have nothing in flight (an ``advance``
  message that was lost);
- first of all, relays outbox rows left undelivered (orchestrator/relay.py).

Each job is handled in its own transaction, and one job's error is logged (with its id)
and counted without ending the pass; only ``TRANSIENT_ABORT`` transient errors in a row
(the database is unreachable) end it early, for the next pass to retry. Every pass that
did something logs its counts per action.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
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
from imgpipe.errors import TransientError
from orchestrator.advance import advance_job, deliver_after_commit
from orchestrator.context import OrchestratorContext
from orchestrator.relay import relay_outbox

__all__ = ["ReapReport", "reap"]

log = logging.getLogger(__name__)

REAP_BATCH = 500
TRANSIENT_ABORT = 3
"""Transient errors in a row after which a pass stops (the database is unreachable)."""
_IN_FLIGHT = (StageStatus.DISPATCHED, StageStatus.RUNNING)


@dataclass
class ReapReport:
    redispatched: int = 0
    """Re-sent: lost messages (queue empty) and stages that died mid-run."""
    redispatched_past_cap: int = 0
    """Re-sent although their queue had a backlog: postponed ``reaper_postpone_max_s``."""
    postponed: int = 0
    """Dispatched and unclaimed, but their queue has a backlog: checked again later."""
    dead: int = 0
    advanced: int = 0
    errors: int = 0
    """Jobs whose handling raised (logged with the job id); the pass went on."""

    def as_dict(self) -> dict[str, int]:
        return dict(vars(self))

    def __str__(self) -> str:
        return ", ".join(f"{name} {count}" for name, count in vars(self).items() if count)


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
        past_cap = False
        if row.status == StageStatus.RUNNING:
            exhausted = row.attempts >= row.max_attempts
            why = f"it ran {row.attempts} time(s) and never finished (worker killed or hung)"
        else:
            if backlog.depth(row.queue) > 0:
                cap_at = (row.dispatched_at or now) + timedelta(
                    seconds=settings.reaper_postpone_max_s
                )
                if now < cap_at:
                    row.deadline_at = min(
                        now + timedelta(seconds=settings.dispatch_timeout_s), cap_at
                    )
                    return "postponed"
                past_cap = True
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
                "reaper: stage %s of job %s %s past %s%s; re-dispatching",
                row.stage, job_id, row.status, row.deadline_at,
                f" and postponed behind a backlog in {row.queue} for "
                f"{settings.reaper_postpone_max_s} s (IMGPIPE_REAPER_POSTPONE_MAX_S)"
                if past_cap else "",
            )  # fmt: skip
            dispatches.append(mark_dispatched(row, now, settings.dispatch_timeout_s))
            action = "redispatched_past_cap" if past_cap else "redispatched"
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
    guard = _Isolation(report)
    for job_id, stage_run_id in overdue:
        with guard.job(job_id, f"stage run {stage_run_id}"):
            action = _reap_stage(ctx, job_id, stage_run_id, backlog)
            if action is not None:
                setattr(report, action, getattr(report, action) + 1)
        if guard.aborted:
            break
    for job_id in [] if guard.aborted else idle_jobs:
        with guard.job(job_id, "advance"):
            after = advance_job(ctx, job_id)
            if after.dispatches or after.events:
                report.advanced += 1
        if guard.aborted:
            break
    if str(report):
        log.info("reaper: %s", report)
    return report


class _Isolation:
    """One job's failure is logged and counted; the pass goes on with the next job, unless
    ``TRANSIENT_ABORT`` transient errors came in a row (the database is unreachable)."""

    def __init__(self, report: ReapReport) -> None:
        self.report = report
        self.transient_in_a_row = 0
        self.aborted = False

    @contextmanager
    def job(self, job_id: str, what: str) -> Iterator[None]:
        try:
            yield
        except TransientError as exc:
            self.report.errors += 1
            self.transient_in_a_row += 1
            log.warning("reaper: job %s (%s) not handled: %s", job_id, what, exc)
            if self.transient_in_a_row >= TRANSIENT_ABORT:
                log.warning(
                    "reaper: %d transient errors in a row (is the database reachable?); "
                    "ending this pass, the next one (IMGPIPE_REAPER_INTERVAL_S) tries again",
                    self.transient_in_a_row,
                )
                self.aborted = True
        except Exception:
            self.report.errors += 1
            self.transient_in_a_row = 0
            log.exception(
                "reaper: job %s (%s) failed; skipped in this pass, the others go on. This is "
                "a bug: report it with the job id", job_id, what,
            )  # fmt: skip
        else:
            self.transient_in_a_row = 0
