"""Read models for the CLI, the Python API and tests: a job with its stages as JSON."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from db.engine import session_scope
from db.models import Detection, Job, StageRun
from db.repo import get_job
from imgpipe.contracts import JobStatus

__all__ = ["all_terminal", "job_report", "job_statuses", "wait_terminal"]


def _iso(value: Any) -> str | None:
    return value.isoformat() if value is not None else None


def stage_report(row: StageRun, detections: int) -> dict[str, Any]:
    return {
        "stage": row.stage,
        "kind": row.kind,
        "status": row.status,
        "attempts": row.attempts,
        "dispatches": row.dispatch_count,
        "queue": row.queue,
        "worker_host": row.worker_host,
        "worker_pid": row.worker_pid,
        "device": row.device,
        "code_version": row.code_version,
        "model": {
            "name": row.model_name,
            "version": row.model_version,
            "weights_sha256": row.model_weights_sha256,
        }
        if row.model_name
        else None,
        "params": row.params,
        "output": row.output,
        "output_blob_key": row.output_blob_key,
        "skip_reason": row.skip_reason,
        "error": row.error,
        "error_history": row.error_history,
        "detections": detections,
        "timings_ms": {
            "queue_wait": row.queue_wait_ms,
            "load": row.load_ms,
            "compute": row.compute_ms,
            "total": row.total_ms,
        },
        "started_at": _iso(row.started_at),
        "finished_at": _iso(row.finished_at),
    }


def job_report(session: Session, job_id: str) -> dict[str, Any] | None:
    job = get_job(session, job_id)
    if job is None:
        return None
    counts: dict[int, int] = dict(
        session.execute(
            select(Detection.stage_run_id, func.count())
            .where(Detection.job_id == job_id)
            .group_by(Detection.stage_run_id)
        ).all()
    )
    elapsed_ms = None
    if job.finished_at is not None:
        elapsed_ms = (job.finished_at - job.created_at).total_seconds() * 1000
    return {
        "job_id": job.id,
        "status": job.status,
        "verdict": job.verdict,
        "reasons": job.reasons,
        "error": job.error,
        "pipeline": job.pipeline,
        "pipeline_hash": job.pipeline_hash,
        "priority": job.priority,
        "source": job.source,
        "idempotency_key": job.idempotency_key,
        "cache_hit_of": job.cache_hit_of,
        "image_sha256": job.image_sha256,
        "input_sha256": job.input_sha256,
        "metadata": job.metadata_json,
        "created_at": _iso(job.created_at),
        "started_at": _iso(job.started_at),
        "finished_at": _iso(job.finished_at),
        "elapsed_ms": elapsed_ms,
        "stages": [stage_report(r, counts.get(r.id, 0)) for r in job.stage_runs],
    }


def job_statuses(session: Session, job_ids: Sequence[str]) -> dict[str, str]:
    rows = session.execute(select(Job.id, Job.status).where(Job.id.in_(list(job_ids)))).all()
    return {job_id: status for job_id, status in rows}


def all_terminal(statuses: Mapping[str, str], job_ids: Sequence[str]) -> bool:
    """True when every one of ``job_ids`` exists and is terminal."""
    return len(statuses) == len(set(job_ids)) and all(
        JobStatus(s).terminal for s in statuses.values()
    )


def wait_terminal(
    database_url: str,
    job_ids: Sequence[str],
    timeout_s: float,
    *,
    poll_s: float = 0.1,
    keep_waiting: Callable[[dict[str, str]], bool] | None = None,
) -> dict[str, str]:
    """Poll the jobs' rows until all are terminal, ``timeout_s`` passes, or
    ``keep_waiting(statuses)`` returns False. Returns the last statuses (job id -> status;
    ids not found are absent): callers check ``all_terminal`` to tell the cases apart."""
    deadline = time.monotonic() + timeout_s
    while True:
        with session_scope(database_url) as session:
            statuses = job_statuses(session, job_ids)
        if (
            all_terminal(statuses, job_ids)
            or time.monotonic() > deadline
            or (keep_waiting is not None and not keep_waiting(statuses))
        ):
            return statuses
        time.sleep(poll_s)
