"""The human review queue: jobs whose policy said ``review`` wait for a person.

``pending_reviews`` lists succeeded jobs with verdict ``review`` and no ``reviews`` row.
``decide`` records who decided what and when (a ``reviews`` row), makes the decision the
job's verdict (appending ``reviewed by NAME: DECISION`` to its reasons) and publishes a
``reviewed`` event on ``imgpipe:events``, the job's ``reply_to`` and every duplicate
submitter's (written to the outbox in the decision's transaction). A reviewed job can be
decided again (a correction): every decision stays in ``reviews``, the latest wins.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import exists, select
from sqlalchemy.orm import Session

from db.engine import session_scope
from db.models import Job, Review, utcnow
from db.outbox import write_outbox
from db.repo import lock_job
from imgpipe.aftercommit import AfterCommit
from imgpipe.contracts import JobStatus
from imgpipe.errors import PermanentError
from imgpipe.events import EventType
from imgpipe.policy import VOCABULARIES
from orchestrator.advance import deliver_after_commit
from orchestrator.context import OrchestratorContext

__all__ = ["ReviewError", "ReviewItem", "ReviewOutcome", "decide", "pending_reviews"]

REVIEW_VERDICT = "review"
MAX_REVIEWER_CHARS = 128


class ReviewError(PermanentError):
    """A decision that cannot be recorded; the message says why and what to do."""


@dataclass(frozen=True)
class ReviewItem:
    job_id: str
    pipeline: str
    choices: tuple[str, ...]
    reasons: list[Any]
    finished_at: datetime | None
    idempotency_key: str | None
    image_sha256: str | None


@dataclass(frozen=True)
class ReviewOutcome:
    job_id: str
    decision: str
    previous_verdict: str | None
    reviewer: str
    at: datetime


def decision_choices(job: Job) -> tuple[str, ...]:
    """The verdicts a reviewer may give: the policy's vocabulary without ``review``."""
    policy = (job.pipeline_spec or {}).get("policy") or {}
    vocabulary = VOCABULARIES.get(str(policy.get("vocabulary", "qc")), VOCABULARIES["qc"])
    return tuple(v for v in vocabulary if v != REVIEW_VERDICT)


def pending_reviews(
    session: Session, *, pipeline: str | None = None, limit: int = 100
) -> list[ReviewItem]:
    """Oldest first: jobs with verdict ``review`` that nobody has decided yet."""
    stmt = (
        select(Job)
        .where(
            Job.status == JobStatus.SUCCEEDED,
            Job.verdict == REVIEW_VERDICT,
            ~exists().where(Review.job_id == Job.id),
        )
        .order_by(Job.finished_at, Job.id)
        .limit(limit)
    )
    if pipeline is not None:
        stmt = stmt.where(Job.pipeline == pipeline)
    return [
        ReviewItem(
            job_id=job.id,
            pipeline=job.pipeline,
            choices=decision_choices(job),
            reasons=list(job.reasons),
            finished_at=job.finished_at,
            idempotency_key=job.idempotency_key,
            image_sha256=job.image_sha256,
        )
        for job in session.execute(stmt).scalars()
    ]


def _reviewable_job(session: Session, job_id: str, decision: str) -> Job:
    """The job, locked, if ``decision`` may be recorded for it; else ReviewError says why."""
    job = lock_job(session, job_id)
    if job is None:
        raise ReviewError(f"no job {job_id}; `imgpipe review list` shows the waiting jobs")
    choices = decision_choices(job)
    if decision not in choices:
        raise ReviewError(
            f"decision {decision!r} is not in pipeline {job.pipeline!r}'s vocabulary; "
            f"choose one of {', '.join(choices)}"
        )
    reviewed_before = session.execute(
        select(Review.id).where(Review.job_id == job_id).limit(1)
    ).first()
    if job.status != JobStatus.SUCCEEDED or (
        job.verdict != REVIEW_VERDICT and reviewed_before is None
    ):
        raise ReviewError(
            f"job {job_id} is {job.status} with verdict {job.verdict!r}: only jobs waiting "
            "for review (or already reviewed) can be decided; see `imgpipe review list`"
        )
    return job


def decide(
    ctx: OrchestratorContext,
    job_id: str,
    decision: str,
    *,
    reviewer: str,
    note: str | None = None,
    guard: Callable[[Session, Job], None] | None = None,
) -> ReviewOutcome:
    """Record a reviewer's decision and make it the job's final verdict.

    ``guard(session, job)`` runs under the job's lock once the decision is known to be
    valid, before it is recorded; it raises ``ReviewError`` to refuse (the review console
    checks there that the reviewer still holds the job's lease: orchestrator/review_lease.py)."""
    reviewer = reviewer.strip()
    if not reviewer or len(reviewer) > MAX_REVIEWER_CHARS:
        raise ReviewError(
            f"reviewer must be a name of 1 to {MAX_REVIEWER_CHARS} characters (--reviewer NAME)"
        )
    now = utcnow()
    with session_scope(ctx.database_url) as session:
        job = _reviewable_job(session, job_id, decision)
        if guard is not None:
            guard(session, job)
        previous = job.verdict
        session.add(Review(job_id=job_id, decision=decision, reviewer=reviewer, note=note, at=now))
        job.verdict = decision
        job.reasons = [*job.reasons, f"reviewed by {reviewer}: {decision}"]
        after = AfterCommit()
        after.event(
            EventType.REVIEWED,
            job_id,
            idempotency_key=job.idempotency_key,
            reply_to=job.reply_to,
            verdict=decision,
            previous_verdict=previous,
            reviewer=reviewer,
            note=note,
            reviewed_at=now.isoformat(),
        )
        write_outbox(session, after)
    deliver_after_commit(ctx, after)
    return ReviewOutcome(job_id, decision, previous, reviewer, now)
