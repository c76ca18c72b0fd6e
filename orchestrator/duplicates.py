"""Answers for duplicate submissions: every submitter of a job hears about it.

A submission whose idempotency key names an existing job (any entry point: stream,
Celery task, Python API, CLI) is a duplicate. If it names a ``reply_to``, one
transaction, under the job's row lock:

- subscribes that stream to the job (a ``job_replies`` row), so the job's ``completed``
  and ``reviewed`` events go to it as well (db/outbox.py fans them out);
- writes to the outbox ``accepted`` with ``duplicate: true`` (on ``imgpipe:events`` and
  the duplicate's reply_to), and, when the job is already terminal, its final event again
  (``replay: true``, on the duplicate's reply_to only) built from SQL.

The job lock orders this against the transaction that completes the job: either the
subscription commits first and the completing transaction sees it, or the job is
terminal when the lock is granted and the final event is replayed here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import select

from db.dag import completed_payload
from db.engine import session_scope
from db.models import Job, JobReply, utcnow
from db.outbox import write_outbox
from db.repo import lock_jobs
from imgpipe.aftercommit import AfterCommit
from imgpipe.contracts import JobStatus
from imgpipe.events import EventType, PendingEvent
from orchestrator.advance import deliver_after_commit
from orchestrator.context import OrchestratorContext

__all__ = ["Duplicate", "answer_duplicates", "final_answer"]


@dataclass(frozen=True)
class Duplicate:
    job_id: str
    reply_to: str


def final_answer(job: Job, reply_to: str) -> PendingEvent:
    """A terminal job's final event (``rejected`` or ``completed``) again, for one
    reply_to stream only, marked ``replay: true``."""
    if job.status == JobStatus.REJECTED:
        reason = job.reasons[0] if job.reasons else None
        fields = {"reason": reason, "error": job.error, "replay": True}
        kind = EventType.REJECTED
    else:
        fields = {**completed_payload(job, job.stage_runs), "replay": True}
        kind = EventType.COMPLETED
    return PendingEvent(kind, job.id, job.idempotency_key, reply_to, fields, on_events_stream=False)


def answer_duplicates(ctx: OrchestratorContext, duplicates: Sequence[Duplicate]) -> None:
    """Subscribe and answer each duplicate (module docstring): one transaction, then the
    answers are published. Raises TransientError if the database is unreachable."""
    if not duplicates:
        return
    after = AfterCommit()
    now = utcnow()
    with session_scope(ctx.database_url) as session:
        jobs = lock_jobs(session, {d.job_id for d in duplicates})
        found = session.execute(
            select(JobReply.job_id, JobReply.reply_to).where(JobReply.job_id.in_(jobs))
        )
        subscribed = {(job_id, reply_to) for job_id, reply_to in found}
        for duplicate in duplicates:
            job = jobs.get(duplicate.job_id)
            if job is None:
                continue
            pair = (job.id, duplicate.reply_to)
            if duplicate.reply_to != job.reply_to and pair not in subscribed:
                session.add(JobReply(job_id=job.id, reply_to=duplicate.reply_to, created_at=now))
                subscribed.add(pair)
            if job.status != JobStatus.REJECTED:
                after.event(
                    EventType.ACCEPTED,
                    job.id,
                    idempotency_key=job.idempotency_key,
                    reply_to=duplicate.reply_to,
                    duplicate=True,
                    pipeline=job.pipeline,
                    image_sha256=job.image_sha256,
                )
            if JobStatus(job.status).terminal:
                after.events.append(final_answer(job, duplicate.reply_to))
        write_outbox(session, after, fan_out=False)
    deliver_after_commit(ctx, after)
