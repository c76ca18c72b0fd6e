"""A duplicate submission's reply: the final event of the job it matched, again, on the
duplicate's own ``reply_to`` (docs/submitting.md: every submitter of a job gets the final
event). Used by the submit-stream consumer (orchestrator/ingest.py)."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

import redis

from db.dag import summary_scores
from db.engine import session_scope
from db.models import Job
from imgpipe.contracts import JobStatus
from imgpipe.errors import TransientError
from imgpipe.events import EventType, encode_fields
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
        encode_fields(fields),  # type: ignore[arg-type]
        maxlen=ctx.settings.events_maxlen,
        approximate=True,
    )


def _final_event(job: Job) -> dict[str, Any]:
    common = {
        "job_id": job.id,
        "idempotency_key": job.idempotency_key,
        "at": time.time(),
        "replay": True,
    }
    if job.status == JobStatus.REJECTED:
        reason = job.reasons[0] if job.reasons else None
        return {"event": str(EventType.REJECTED), **common, "reason": reason, "error": job.error}
    outputs: Mapping[str, Mapping[str, Any]] = {
        r.stage: r.output for r in job.stage_runs if r.status == "succeeded" and r.output
    }
    return {
        "event": str(EventType.COMPLETED),
        **common,
        "status": job.status,
        "verdict": job.verdict,
        "reasons": job.reasons,
        "error": job.error,
        "stages": {r.stage: r.status for r in job.stage_runs},
        "scores": summary_scores(outputs),
        "cache_hit": job.cache_hit_of is not None,
    }
