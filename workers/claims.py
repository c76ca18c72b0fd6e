"""Claiming stage runs: one transaction for a whole batch of stage messages.

A claim moves a row ``dispatched -> running`` and counts the attempt; a message for a row
that is finished, missing or not yet dispatched claims nothing (at-least-once delivery
makes duplicates normal). Rows are locked in id order so that concurrent claimers and
the job-locking persist step never wait on each other in a cycle.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from db.models import Image, Job, StageRun
from imgpipe.contracts import JobStatus, StageStatus
from workers.timelimits import hard_limit_s

__all__ = [
    "Claim",
    "ClaimRequest",
    "Outcome",
    "WorkerIdentity",
    "claim_in_place",
    "claim_rows",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClaimRequest:
    stage_run_id: int
    celery_task_id: str | None = None


@dataclass(frozen=True)
class WorkerIdentity:
    host: str
    pid: int
    device: str
    code_version: str
    dispatch_grace_s: int


@dataclass(frozen=True)
class Claim:
    stage_run_id: int
    job_id: str
    stage: str
    kind: str
    attempt: int
    params: dict[str, Any]
    image_key: str
    original_size: tuple[int, int]
    upstream: dict[str, dict[str, Any]]
    idempotency_key: str | None
    priority: str = "interactive"
    queue: str = ""
    task_id: str | None = None
    """The Celery task id of the message, or ``local-<uuid>`` for a stage continued locally."""
    time_limit_s: float | None = None
    """The stage's soft time limit (workers/timelimits.py)."""
    upstream_kinds: dict[str, str] = field(default_factory=dict)
    """Stage name -> kind of each entry of ``upstream`` (which schema its output follows)."""
    queue_wait_ms: float | None = None
    """From the row's dispatch to this claim (the queue wait metric)."""


@dataclass(frozen=True)
class Outcome:
    """What happened to one stage message; ``retry_in_s`` set means: send it again after
    this delay (the row is already back to ``dispatched``)."""

    status: str
    job_id: str | None = None
    retry_in_s: float | None = None
    error: str | None = None


@dataclass(frozen=True)
class NoInput:
    """A claimed row whose input image cannot exist: it fails for good with ``error``."""

    claim_row_id: int
    job_id: str
    stage: str
    attempt: int
    idempotency_key: str | None
    error: str


def _lock_rows(
    session: Session, ids: Sequence[int]
) -> tuple[dict[int, StageRun], dict[str, Job], dict[str, Image]]:
    """The stage rows (locked, in id order) with their jobs and images, in one query."""
    stmt = (
        select(StageRun, Job, Image)
        .join(Job, StageRun.job_id == Job.id)
        .outerjoin(Image, Job.image_sha256 == Image.sha256)
        .where(StageRun.id.in_(sorted(set(ids))))
        .order_by(StageRun.id)
        .with_for_update(of=StageRun)
        .execution_options(populate_existing=True)
    )
    rows: dict[int, StageRun] = {}
    jobs: dict[str, Job] = {}
    images: dict[str, Image] = {}
    for row, job, image in session.execute(stmt):
        rows[row.id] = row
        jobs[job.id] = job
        if image is not None:
            images[image.sha256] = image
    return rows, jobs, images


def _start(row: StageRun, request: ClaimRequest, now: datetime, me: WorkerIdentity) -> None:
    row.status = StageStatus.RUNNING
    row.started_at = now
    # past the hard limit (the attempt cannot still be running), plus the grace
    row.deadline_at = now + timedelta(seconds=hard_limit_s(row.time_limit_s) + me.dispatch_grace_s)
    row.worker_host = me.host
    row.worker_pid = me.pid
    row.device = me.device
    row.code_version = me.code_version
    row.celery_task_id = request.celery_task_id
    if row.dispatched_at is not None:
        row.queue_wait_ms = (now - row.dispatched_at).total_seconds() * 1000


def claim_rows(
    session: Session, requests: Sequence[ClaimRequest], now: datetime, me: WorkerIdentity
) -> list[Claim | Outcome | NoInput]:
    """Claim every requested row in the caller's transaction; one result per request."""
    rows, jobs, images = _lock_rows(session, [r.stage_run_id for r in requests])
    needs_siblings = {row.job_id for row in rows.values() if row.needs or row.reads != "original"}
    siblings: dict[str, dict[str, StageRun]] = {}
    if needs_siblings:
        for sibling in session.execute(
            select(StageRun).where(StageRun.job_id.in_(needs_siblings))
        ).scalars():
            siblings.setdefault(sibling.job_id, {})[sibling.stage] = sibling
    results: list[Claim | Outcome | NoInput] = []
    seen: set[int] = set()
    for request in requests:
        row = rows.get(request.stage_run_id)
        if row is None:
            log.warning("stage run %s does not exist; dropping the message", request.stage_run_id)
            results.append(Outcome("missing"))
            continue
        if row.id in seen or StageStatus(row.status).terminal:
            results.append(Outcome("duplicate", row.job_id))
            continue
        seen.add(row.id)
        claimed = _claim_one(row, jobs[row.job_id], request, now, me)
        results.append(
            claimed if claimed is not None
            else _claim_of(row, jobs[row.job_id], images, siblings.get(row.job_id, {}))
        )  # fmt: skip
    return results


def _claim_one(
    row: StageRun, job: Job, request: ClaimRequest, now: datetime, me: WorkerIdentity
) -> Outcome | None:
    """Move one locked, not yet terminal row to ``running`` for this worker (None), or say
    why it is not claimed (an Outcome; the row may have become ``skipped`` or ``dead``)."""
    if row.status == StageStatus.PENDING:
        log.warning("stage run %s is still pending; not dispatched yet", row.id)
        return Outcome("not_dispatched", row.job_id)
    retake = _own_unacknowledged_claim(row, request, me)
    if (
        row.status == StageStatus.RUNNING
        and row.deadline_at is not None
        and row.deadline_at > now
        and not retake
    ):
        # A live attempt holds it (a duplicate delivery, or a message the reaper
        # re-sent too early): never start a second run of the same stage.
        return Outcome("running_elsewhere", row.job_id)
    if JobStatus(job.status).terminal:
        row.status = StageStatus.SKIPPED
        row.skip_reason = f"job_{job.status}"
        row.finished_at = now
        return Outcome("skipped", row.job_id)
    if retake:
        log.warning(
            "stage run %s: this worker's claim of it committed but the database's answer "
            "was lost; running it as attempt %s", row.id, row.attempts,
        )  # fmt: skip
        _start(row, request, now, me)
        return None
    row.attempts += 1
    if row.attempts > row.max_attempts:
        row.status = StageStatus.DEAD
        row.finished_at = now
        row.error = (
            f"gave up after {row.max_attempts} attempts; last error: {row.error or 'worker lost'}"
        )
        return Outcome("dead", row.job_id, error=row.error)
    _start(row, request, now, me)
    return None


def _own_unacknowledged_claim(row: StageRun, request: ClaimRequest, me: WorkerIdentity) -> bool:
    """The row is ``running`` in this very process for this very message: a claim of ours
    committed but its connection died before the answer came back, and the claim was
    tried again. One process claims one batch at a time, so nothing else is running it."""
    return (
        row.status == StageStatus.RUNNING
        and request.celery_task_id is not None
        and not request.celery_task_id.startswith("local-")
        and row.celery_task_id == request.celery_task_id
        and row.worker_pid == me.pid
        and row.worker_host == me.host
    )


def claim_in_place(
    row: StageRun,
    job: Job,
    image: Image | None,
    siblings: dict[str, StageRun],
    now: datetime,
    me: WorkerIdentity,
    request: ClaimRequest,
) -> Claim | NoInput:
    """Claim a row the caller's transaction already holds (its job locked): attempt + 1,
    ``running`` on this worker. Used to continue a job locally (workers/persist.py)."""
    probe = _claim_of(row, job, {image.sha256: image} if image else {}, siblings)
    if isinstance(probe, NoInput):
        return probe  # nothing claimed: the normal path will fail it
    row.attempts += 1
    _start(row, request, now, me)
    return replace(
        probe,
        attempt=row.attempts,
        task_id=request.celery_task_id,
        queue_wait_ms=row.queue_wait_ms,
    )


def _claim_of(
    row: StageRun, job: Job, images: dict[str, Image], siblings: dict[str, StageRun]
) -> Claim | NoInput:
    image = images.get(job.image_sha256) if job.image_sha256 else None
    if image is None or image.working_blob_key is None:
        return NoInput(
            row.id, job.id, row.stage, row.attempts, job.idempotency_key,
            f"job {job.id} has no stored image; resubmit it",
        )  # fmt: skip
    image_key = image.working_blob_key
    if row.reads != "original":
        key = (siblings[row.reads].output or {}).get("working_blob_key")
        if not isinstance(key, str):
            return NoInput(
                row.id,
                job.id,
                row.stage,
                row.attempts,
                job.idempotency_key,
                f"stage {row.stage} reads the output of {row.reads}, which stored no image",
            )
        image_key = key
    return Claim(
        stage_run_id=row.id,
        job_id=job.id,
        stage=row.stage,
        kind=row.kind,
        attempt=row.attempts,
        params=dict(row.params),
        image_key=image_key,
        original_size=(image.width, image.height),
        upstream={n: dict(siblings[n].output or {}) for n in row.needs},
        upstream_kinds={n: siblings[n].kind for n in row.needs},
        idempotency_key=job.idempotency_key,
        priority=job.priority,
        queue=row.queue,
        task_id=row.celery_task_id,
        time_limit_s=row.time_limit_s,
        queue_wait_ms=row.queue_wait_ms,
    )
