"""Leases on the review queue: two reviewers never see the same job at the same moment.

A reviewer takes the next waiting job with ``take_next``: one ``review_leases`` row per job
names the reviewer and an expiry. Taking one, in one transaction:

1. the reviewer's earlier leases are released (one item at a time per reviewer);
2. candidates are read: waiting jobs (``pending_reviews``' conditions) with no lease, an
   expired one, or one of this reviewer's, oldest first or by score (``ORDERS``);
3. for each candidate in turn, the job row is locked with ``FOR UPDATE SKIP LOCKED`` on
   PostgreSQL (a row another taker or a decision holds is skipped, not waited for) and
   still waiting for review, then the lease is written by a conditional upsert
   (``INSERT .. ON CONFLICT (job_id) DO UPDATE .. WHERE expired OR mine RETURNING``):
   a lease someone else committed meanwhile makes it return nothing and the next
   candidate is tried. SQLite serialises every transaction (``BEGIN IMMEDIATE``), so
   there the same statements run one taker at a time.

A decision (``decide_leased``) locks the job (``orchestrator.review.decide``), checks that
the reviewer still holds the lease (expired but not taken by anyone else counts) and that
nobody decided it yet, and deletes the lease in the transaction that stores the review:
every decision is stored once. A lease that expires (the browser went away) makes the job
available again; the console renews its lease while the job is on screen (``renew``).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Final

from sqlalchemy import Select, delete, exists, func, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from db.engine import session_scope
from db.models import Job, Review, ReviewLease, utcnow
from imgpipe.contracts import JobStatus
from orchestrator.context import OrchestratorContext
from orchestrator.review import REVIEW_VERDICT, ReviewError, ReviewOutcome, decide
from orchestrator.review_view import review_scores

__all__ = [
    "CANDIDATE_WINDOW",
    "ORDERS",
    "AlreadyDecidedError",
    "Lease",
    "LeaseLostError",
    "decide_leased",
    "queue_counts",
    "release",
    "renew",
    "take_next",
]

ORDERS: Final = ("oldest", "score")
CANDIDATE_WINDOW: Final = 200
"""How many of the oldest waiting jobs a take considers. ``score`` order ranks within
them, so that a take costs the same with a million jobs waiting."""


class LeaseLostError(ReviewError):
    """The reviewer does not hold the job's lease (it expired and someone else took it,
    or it was released); the console loads the next item."""


class AlreadyDecidedError(ReviewError):
    """Someone decided the job already (a decision is stored once)."""


@dataclass(frozen=True)
class Lease:
    job_id: str
    reviewer: str
    expires_at: datetime


def _waiting() -> list[Any]:
    """The conditions of a job waiting for a person (as ``pending_reviews``)."""
    return [
        Job.status == JobStatus.SUCCEEDED,
        Job.verdict == REVIEW_VERDICT,
        ~exists().where(Review.job_id == Job.id),
    ]


def _candidates(
    session: Session,
    reviewer: str,
    now: datetime,
    exclude: Collection[str],
    pipeline: str | None,
) -> list[str]:
    stmt: Select[str] = (
        select(Job.id)
        .outerjoin(ReviewLease, ReviewLease.job_id == Job.id)
        .where(
            *_waiting(),
            or_(
                ReviewLease.job_id.is_(None),
                ReviewLease.expires_at <= now,
                ReviewLease.reviewer == reviewer,
            ),
        )
        .order_by(Job.finished_at, Job.id)
        .limit(CANDIDATE_WINDOW)
    )
    if exclude:
        stmt = stmt.where(Job.id.not_in(list(exclude)))
    if pipeline is not None:
        stmt = stmt.where(Job.pipeline == pipeline)
    return list(session.execute(stmt).scalars())


def _by_score(session: Session, job_ids: list[str]) -> list[str]:
    """Highest score first (orchestrator/review_view.py ``review_scores``), jobs without
    a score last; ties keep the oldest first."""
    scores = review_scores(session, job_ids)
    ranked = sorted(
        enumerate(job_ids),
        key=lambda item: (scores.get(item[1]) is None, -(scores.get(item[1]) or 0.0), item[0]),
    )
    return [job_id for _, job_id in ranked]


def _lock_if_waiting(session: Session, job_id: str) -> bool:
    """Lock the job row unless another transaction holds it (PostgreSQL: SKIP LOCKED),
    and only while it still waits for review."""
    stmt = (
        select(Job.id)
        .where(Job.id == job_id, *_waiting())
        .with_for_update(skip_locked=True, of=Job)
    )
    return session.execute(stmt).first() is not None


def _upsert_lease(
    session: Session, job_id: str, reviewer: str, now: datetime, expires_at: datetime
) -> bool:
    """Write the lease unless someone else holds it unexpired; True when written."""
    dialect = session.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    values = insert(ReviewLease).values(
        job_id=job_id, reviewer=reviewer, taken_at=now, expires_at=expires_at
    )
    stmt = values.on_conflict_do_update(
        index_elements=[ReviewLease.job_id],
        set_={"reviewer": reviewer, "taken_at": now, "expires_at": expires_at},
        where=or_(ReviewLease.expires_at <= now, ReviewLease.reviewer == reviewer),
    ).returning(ReviewLease.job_id)
    return session.execute(stmt).first() is not None


def take_next(
    database_url: str,
    reviewer: str,
    *,
    lease_s: float,
    order: str = "oldest",
    exclude: Collection[str] = (),
    pipeline: str | None = None,
) -> Lease | None:
    """Lease the next waiting job to ``reviewer`` (see the module), or None when no job is
    waiting that this reviewer may take."""
    if order not in ORDERS:
        raise ReviewError(f"order {order!r} is not one of {', '.join(ORDERS)}")
    now = utcnow()
    expires_at = now + timedelta(seconds=lease_s)
    with session_scope(database_url) as session:
        session.execute(delete(ReviewLease).where(ReviewLease.reviewer == reviewer))
        candidates = _candidates(session, reviewer, now, exclude, pipeline)
        if order == "score":
            candidates = _by_score(session, candidates)
        for job_id in candidates:
            if _lock_if_waiting(session, job_id) and _upsert_lease(
                session, job_id, reviewer, now, expires_at
            ):
                return Lease(job_id, reviewer, expires_at)
    return None


def renew(database_url: str, job_id: str, reviewer: str, *, lease_s: float) -> Lease:
    """Extend the reviewer's lease (a conditional UPDATE); LeaseLostError when the lease is
    no longer theirs."""
    expires_at = utcnow() + timedelta(seconds=lease_s)
    with session_scope(database_url) as session:
        updated = session.execute(
            update(ReviewLease)
            .where(ReviewLease.job_id == job_id, ReviewLease.reviewer == reviewer)
            .values(expires_at=expires_at)
        )
        if getattr(updated, "rowcount", 0) != 1:
            raise LeaseLostError(
                f"{reviewer} no longer holds the lease on job {job_id}; load the next item"
            )
    return Lease(job_id, reviewer, expires_at)


def release(database_url: str, job_id: str, reviewer: str) -> bool:
    """Give the job back to the queue (skip); False when the reviewer held no lease on it."""
    with session_scope(database_url) as session:
        deleted = session.execute(
            delete(ReviewLease).where(
                ReviewLease.job_id == job_id, ReviewLease.reviewer == reviewer
            )
        )
        return getattr(deleted, "rowcount", 0) == 1


def decide_leased(
    ctx: OrchestratorContext,
    job_id: str,
    decision: str,
    *,
    reviewer: str,
    note: str | None = None,
) -> ReviewOutcome:
    """``decide``, only while ``reviewer`` holds the job's lease and nobody decided it yet;
    the lease is deleted in the same transaction as the review is stored."""

    def holds_lease(session: Session, job: Job) -> None:
        lease = session.get(ReviewLease, job.id, with_for_update=True)
        if lease is None or lease.reviewer != reviewer:
            holder = f" ({lease.reviewer} holds it now)" if lease is not None else ""
            raise LeaseLostError(
                f"{reviewer} does not hold the lease on job {job.id}{holder}: it expired or "
                "was released; load the next item"
            )
        if session.execute(select(Review.id).where(Review.job_id == job.id).limit(1)).first():
            raise AlreadyDecidedError(f"job {job.id} was decided already; load the next item")
        session.delete(lease)

    return decide(ctx, job_id, decision, reviewer=reviewer, note=note, guard=holds_lease)


def queue_counts(database_url: str, pipeline: str | None = None) -> tuple[int, int]:
    """(jobs waiting for review, how many of them are leased to someone right now), of
    one pipeline or all."""
    now = utcnow()
    where = [*_waiting(), *([Job.pipeline == pipeline] if pipeline is not None else [])]
    with session_scope(database_url) as session:
        waiting = session.execute(select(func.count()).select_from(Job).where(*where))
        leased = session.execute(
            select(func.count())
            .select_from(Job)
            .join(ReviewLease, ReviewLease.job_id == Job.id)
            .where(*where, ReviewLease.expires_at > now)
        )
        return int(waiting.scalar_one()), int(leased.scalar_one())
