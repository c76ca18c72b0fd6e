"""A duplicate submission's reply: the final event of the job it matched, again, on the
duplicate's own ``reply_to`` (docs/submitting.md: every submitter of a job gets the final
event). Used by the submit-stream consumer (orchestrator/ingest.py)."""

from __future__ import annotations

import logging
from typing import Any

import redis

from db.dag import completed_payload
from db.engine import session_scope
from db.models import Job
from imgpipe.contracts import JobStatus
from imgpipe.errors import TransientError
from imgpipe.events import EventType, PendingEvent
from orchestrator.context import OrchestratorContext
from orchestrator.submit import SubmitResult

__all__ = ["replay_final"]

log = logging.getLogger(__name__)


def replay_final(
    ctx: OrchestratorContext,
    pipe: redis.client.Pipeline,
    result: SubmitResult,
    reply_to: str | None,
) -> None:
    """A duplicate of a finished job: its final event again, on this entry's reply_to."""
    if not reply_to:
        return
    try:
        with session_scope(ctx.database_url) as session:
            job = session.get(Job, result.job_id)
            if job is None or not JobStatus(job.status).terminal:
                return  # the completed event goes to the first submission's reply_to
            fields = _final_event(job)
    except TransientError as exc:
        log.warning("ingest: final event of job %s not replayed: %s", result.job_id, exc)
        return
    pipe.xadd(
        reply_to,
        fields,  # type: ignore[arg-type]
        maxlen=ctx.settings.events_maxlen,
        approximate=True,
    )


def _final_event(job: Job) -> dict[str, str]:
    """The job's final event as first sent (db/dag.py ``completed_payload``, or the
    rejection), marked ``replay``."""
    if job.status == JobStatus.REJECTED:
        reason = job.reasons[0] if job.reasons else None
        fields: dict[str, Any] = {"reason": reason, "error": job.error}
        event = EventType.REJECTED
    else:
        fields, event = completed_payload(job, job.stage_runs), EventType.COMPLETED
    return PendingEvent(
        event, job.id, job.idempotency_key, fields={**fields, "replay": True}
    ).entry()
