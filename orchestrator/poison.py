"""A submission that kills the process handling it, again and again, ends ``rejected``.

Used by the ``imgpipe.submit`` task (orchestrator/submit_task.py) once its deliveries
died ``IMGPIPE_INGEST_MAX_DELIVERIES`` times: the bytes are not decoded again. The job
row is written like any rejected image (status ``rejected``, no images row, the reason in
``jobs.reasons``/``jobs.error``) so the idempotency key has its terminal answer, and a
``rejected`` event goes to ``imgpipe:events`` and the submission's ``reply_to``.
"""

from __future__ import annotations

import logging

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from db.blobs import sha256_bytes
from db.engine import session_scope
from db.models import Job, new_uuid, utcnow
from db.outbox import write_outbox
from imgpipe.aftercommit import AfterCommit
from imgpipe.contracts import JobStatus
from imgpipe.events import EventType
from orchestrator.advance import deliver_after_commit
from orchestrator.context import OrchestratorContext
from orchestrator.submit import SubmitRequest, SubmitResult

__all__ = ["CRASHED_REASON", "reject_crashing"]

log = logging.getLogger(__name__)

CRASHED_REASON = "crashed_worker"


def _existing(ctx: OrchestratorContext, key: str | None) -> SubmitResult | None:
    if key is None:
        return None
    with session_scope(ctx.database_url) as session:
        row = session.execute(
            select(Job.id, Job.status).where(Job.idempotency_key == key)
        ).one_or_none()
    return None if row is None else SubmitResult(row.id, row.status, created=False)


def reject_crashing(ctx: OrchestratorContext, request: SubmitRequest, crashes: int) -> SubmitResult:
    """The rejected job (or the job its key already has) of a submission whose handling
    died ``crashes`` times."""
    found = _existing(ctx, request.idempotency_key)
    if found is not None:
        return found
    message = (
        f"the process handling this submission died {crashes} times while decoding and "
        f"storing it (IMGPIPE_INGEST_MAX_DELIVERIES={ctx.settings.ingest_max_deliveries}); "
        "imgpipe will not try it again. The file may crash the image decoder: check it, or "
        "send another file"
    )
    now = utcnow()
    job = Job(
        id=new_uuid(),
        created_at=now,
        finished_at=now,
        input_sha256=sha256_bytes(request.data),
        pipeline=request.pipeline[:64],
        pipeline_hash="",
        status=JobStatus.REJECTED,
        priority=str(request.priority),
        source=request.source,
        idempotency_key=request.idempotency_key,
        metadata_json=dict(request.metadata or {}),
        overrides={k: dict(v) for k, v in (request.overrides or {}).items()},
        reply_to=request.reply_to,
        reasons=[CRASHED_REASON],
        error=message,
    )
    after = AfterCommit()
    after.event(
        EventType.REJECTED,
        job.id,
        idempotency_key=job.idempotency_key,
        reply_to=job.reply_to,
        reason=CRASHED_REASON,
        error=message,
    )
    try:
        with session_scope(ctx.database_url) as session:
            session.add(job)
            write_outbox(session, after, fan_out=False)  # the answer, in the same commit
    except IntegrityError:  # a concurrent delivery of the same key committed first
        found = _existing(ctx, request.idempotency_key)
        if found is None:
            raise
        return found
    log.error("submission %s rejected: %s", request.idempotency_key, message)
    deliver_after_commit(ctx, after)
    return SubmitResult(job.id, job.status, created=True, reason=message)
