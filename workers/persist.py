"""Recording finished stage runs and stepping their jobs, in one transaction per batch.

For a batch of finished stage runs this locks their jobs (in id order), writes each
result with its provenance, replaces its detections, and runs the DAG step (db/dag.py)
for each job — so the next stages are marked dispatched in the same commit that records
the result, and no ``advance`` message is needed. What must be sent (next stage
messages, events, webhooks) comes back as an ``AfterCommit`` for the caller to deliver;
the answers among them (a job's ``completed`` event, its webhook) are also written to the
outbox in this transaction (db/outbox.py: one executemany, only when a job completed).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete
from sqlalchemy.orm import Session

from db.dag import advance_locked
from db.models import Detection, Image, Job, StageRun
from db.outbox import write_outbox
from db.repo import lock_jobs
from imgpipe.aftercommit import AfterCommit
from imgpipe.contracts import Priority, StageStatus
from imgpipe.events import EventType
from imgpipe.settings import Settings
from workers.claims import Claim, ClaimRequest, Outcome, WorkerIdentity, claim_in_place
from workers.runtime import StageOutput, StageSkip

__all__ = ["Failure", "Finished", "persist_finished"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LocalContinuation:
    """Claim ready stages on ``queues`` for this worker inside the persist transaction
    (at most ``limit``, interactive jobs only) instead of sending their messages.

    Depth-first: a worker that finished a stage runs the job's next stage itself, with
    its pixels still cached, saving the message hop and a claim transaction. Bulk jobs
    always go through their queue, so interactive messages overtake them. A crash is
    recovered like any crash mid-stage: the row is ``running`` with a deadline, and the
    reaper re-dispatches it."""

    queues: frozenset[str]
    identity: WorkerIdentity
    limit: int


@dataclass(frozen=True)
class Failure:
    error: str
    permanent: bool


@dataclass(frozen=True)
class Finished:
    stage_run_id: int
    job_id: str
    stage: str
    attempt: int
    idempotency_key: str | None
    result: StageOutput | StageSkip | Failure
    output: dict[str, Any] | None = None
    """The JSON to store for a StageOutput (its ``output`` plus working-copy keys)."""
    blob_key: str | None = None
    load_ms: float | None = None
    compute_ms: float | None = None
    started_perf_s: float | None = None
    """``time.perf_counter()`` when the worker took the message: ``total_ms`` runs from
    there to the moment the result is written (claim, load, compute, store, persist)."""
    batch_size: int = 1


def _record_success(session: Session, row: StageRun, item: Finished, result: StageOutput) -> None:
    row.status = StageStatus.SUCCEEDED
    row.output = item.output if item.output is not None else dict(result.output)
    row.output_blob_key = item.blob_key
    if result.model is not None:
        row.model_name = result.model.get("name")
        row.model_version = result.model.get("version")
        row.model_weights_sha256 = result.model.get("weights_sha256")
    session.add_all(
        Detection(
            stage_run_id=row.id,
            job_id=row.job_id,
            label=d.label,
            score=d.score,
            x1=d.x1,
            y1=d.y1,
            x2=d.x2,
            y2=d.y2,
        )
        for d in result.detections
    )


def _record_failure(
    row: StageRun, failure: Failure, now: datetime, settings: Settings
) -> float | None:
    """Record the error; returns the retry delay if the row goes back to ``dispatched``."""
    row.error = failure.error
    row.error_history = [
        *row.error_history,
        {"at": now.isoformat(), "attempt": row.attempts, "error": failure.error},
    ]
    if failure.permanent or row.attempts >= row.max_attempts:
        row.status = StageStatus.FAILED if failure.permanent else StageStatus.DEAD
        row.finished_at = now
        return None
    retry_in: float = min(
        settings.retry_backoff_s * 2 ** max(row.attempts - 1, 0), settings.retry_backoff_max_s
    )
    row.status = StageStatus.DISPATCHED
    row.dispatched_at = now
    row.deadline_at = now + timedelta(seconds=retry_in + settings.dispatch_timeout_s)
    return retry_in


def persist_finished(
    session: Session,
    items: Sequence[Finished],
    now: datetime,
    settings: Settings,
    local: LocalContinuation | None = None,
) -> tuple[list[Outcome], AfterCommit, list[Claim]]:
    """Write every finished run and step each touched job; one outcome per item, the
    after-commit effects, and the stages claimed for this worker (``local``)."""
    after = AfterCommit()
    jobs = lock_jobs(session, {item.job_id for item in items})
    rows = {r.id: r for job in jobs.values() for r in job.stage_runs}
    # Detections are written only by the transaction that makes a row terminal, so only a
    # row retried after a lost commit acknowledgement could have some: clear those.
    retried = [
        item.stage_run_id
        for item in items
        if isinstance(item.result, StageOutput) and item.attempt > 1
    ]
    if retried:
        session.execute(delete(Detection).where(Detection.stage_run_id.in_(retried)))
    outcomes: list[Outcome] = []
    for item in items:
        row = rows.get(item.stage_run_id)
        if row is None or StageStatus(row.status).terminal:
            outcomes.append(Outcome("duplicate", item.job_id))
            continue
        if row.status != StageStatus.RUNNING or row.attempts != item.attempt:
            # The claim's token is its attempt number: a later attempt owns the row now
            # (the reaper re-dispatched it), so this result and provenance are dropped.
            log.warning(
                "stage run %s: attempt %s finished but the row is %s at attempt %s; "
                "its result is discarded, the current attempt will write one",
                row.id, item.attempt, row.status, row.attempts,
            )  # fmt: skip
            outcomes.append(Outcome("superseded", item.job_id))
            continue
        row.load_ms = item.load_ms
        row.compute_ms = item.compute_ms
        if item.started_perf_s is not None:
            row.total_ms = (time.perf_counter() - item.started_perf_s) * 1000
        row.batch_size = item.batch_size
        result = item.result
        common: dict[str, Any] = {"idempotency_key": item.idempotency_key, "stage": item.stage}
        if isinstance(result, Failure):
            retry_in = _record_failure(row, result, now, settings)
            if retry_in is not None:
                log.warning(
                    "stage run %s failed transiently (%s); retry in %.1f s",
                    row.id, result.error, retry_in,
                )  # fmt: skip
                outcomes.append(Outcome("retrying", row.job_id, retry_in, result.error))
                continue
            after.event(
                EventType.STAGE_FAILED, row.job_id, status=row.status, error=result.error, **common
            )
            outcomes.append(Outcome(str(row.status), row.job_id, error=result.error))
            continue
        row.finished_at = now
        if isinstance(result, StageSkip):
            row.status = StageStatus.SKIPPED
            row.skip_reason = result.reason
            row.output = {"skipped": result.reason, "detail": result.detail}
            event = EventType.STAGE_SKIPPED
        else:
            _record_success(session, row, item, result)
            event = EventType.STAGE_SUCCEEDED
        after.event(
            event,
            row.job_id,
            attempt=item.attempt,
            compute_ms=round(item.compute_ms or 0.0, 2),
            **common,
        )
        outcomes.append(Outcome(str(event), row.job_id))
    webhook = bool(settings.webhook_url)
    for job in jobs.values():
        after.extend(advance_locked(job, now, settings.dispatch_timeout_s, webhook=webhook))
    claims = _continue_locally(session, jobs, after, now, local) if local else []
    write_outbox(session, after)
    return outcomes, after, claims


def _continue_locally(
    session: Session,
    jobs: dict[str, Job],
    after: AfterCommit,
    now: datetime,
    local: LocalContinuation,
) -> list[Claim]:
    claims: list[Claim] = []
    kept = []
    rows = {r.id: r for job in jobs.values() for r in job.stage_runs}
    for dispatch in after.dispatches:
        row = rows.get(dispatch.stage_run_id)
        job = jobs.get(row.job_id) if row is not None else None
        if (
            row is None
            or job is None
            or dispatch.queue not in local.queues
            or job.priority != Priority.INTERACTIVE
            or len(claims) >= local.limit
            or row.attempts >= row.max_attempts
        ):
            kept.append(dispatch)
            continue
        image = session.get(Image, job.image_sha256) if job.image_sha256 else None
        claim = claim_in_place(
            row, job, image, {r.stage: r for r in job.stage_runs}, now, local.identity,
            ClaimRequest(row.id, f"local-{uuid.uuid4()}"),
        )  # fmt: skip
        if isinstance(claim, Claim):
            claims.append(claim)
        else:  # cannot run here (no input): let the normal path fail it
            kept.append(dispatch)
    after.dispatches = kept
    return claims
