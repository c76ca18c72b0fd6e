"""Running one stage run: claim, load, compute, persist — with provenance.

This is the shared base of every stage task (DESIGN.md "worker" flow). Task bodies in
workers/tasks.py only call ``StageExecutor.run``. Every step is written for
at-least-once delivery: a duplicate message for a finished row is a no-op, results are
upserts on the (job, stage) row, detections are replaced, blobs are content-addressed.
"""

from __future__ import annotations

import importlib
import io
import logging
import os
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
from numpy.typing import NDArray
from PIL import Image as PILImage
from sqlalchemy import delete

from db.blobs import BlobStore, open_blob_store
from db.engine import session_scope
from db.models import Detection, Image, Job, StageRun, utcnow
from db.repo import lock_stage_run, record_model
from imgpipe.contracts import JobStatus, StageStatus
from imgpipe.errors import PermanentError, TransientError
from imgpipe.events import EventPublisher, EventType
from imgpipe.settings import Settings
from imgpipe.stagekinds import STAGE_KINDS
from workers.pixels import PixelCache, encode_npy
from workers.runtime import BatchRunner, StageInput, StageOutput, StageSkip
from workers.version import code_version

__all__ = ["Claim", "Outcome", "StageExecutor"]

log = logging.getLogger(__name__)


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


@dataclass(frozen=True)
class Outcome:
    """What happened; ``retry_in_s`` set means: raise a Celery retry after this delay."""

    status: str
    job_id: str | None = None
    advance: bool = False
    retry_in_s: float | None = None
    error: str | None = None
    priority: str | None = None
    """The job's priority: its ``advance`` goes to the matching control queue."""


ARTIFACT_JPEG_QUALITY = 95


def _viewable_jpeg(pixels: NDArray[np.uint8]) -> bytes:
    """The human-viewable copy of an output image. Downstream stages never read it: they
    read the lossless .npy working copy. (PNG cost ~140 ms at 1080p here, JPEG ~10 ms.)"""
    buffer = io.BytesIO()
    PILImage.fromarray(pixels).save(buffer, format="JPEG", quality=ARTIFACT_JPEG_QUALITY)
    return buffer.getvalue()


class StageExecutor:
    def __init__(self, settings: Settings, device: str = "cpu") -> None:
        self.settings = settings
        self.device = device
        self.host = socket.gethostname()
        self.code_version = settings.code_version or code_version()
        self._blobs: BlobStore | None = None
        self._pixels: PixelCache | None = None
        self.events = EventPublisher(settings.effective_redis_url, settings.events_maxlen)
        self._runners: dict[str, BatchRunner] = {}
        self._recorded_models: set[tuple[str, str, str]] = set()

    @property
    def db_url(self) -> str:
        return self.settings.effective_database_url

    @property
    def blobs(self) -> BlobStore:
        if self._blobs is None:
            self._blobs = open_blob_store(self.settings.effective_blob_url)
        return self._blobs

    @property
    def pixels(self) -> PixelCache:
        if self._pixels is None:
            self._pixels = PixelCache(self.blobs, self.settings.working_copy_cache_items)
        return self._pixels

    def runner(self, kind: str) -> BatchRunner:
        runner = self._runners.get(kind)
        if runner is None:
            spec = STAGE_KINDS[kind]
            runner = getattr(importlib.import_module(spec.implementation), spec.entry)
            self._runners[kind] = runner
        return runner

    def record_model(self, info: Mapping[str, str]) -> None:
        """Write the ``models`` row the first time this process uses a model."""
        key = (info["name"], info["version"], info["weights_sha256"])
        if key in self._recorded_models:
            return
        with session_scope(self.db_url) as session:
            record_model(
                session,
                name=info["name"],
                version=info["version"],
                weights_sha256=info["weights_sha256"],
                source=info["source"],
                license=info["license"],
            )
        self._recorded_models.add(key)

    # -- claim --------------------------------------------------------------------------
    def claim(self, stage_run_id: int, celery_task_id: str | None) -> Claim | Outcome:
        now = utcnow()
        with session_scope(self.db_url) as session:
            row = lock_stage_run(session, stage_run_id)
            if row is None:
                log.warning("stage run %s does not exist; dropping the message", stage_run_id)
                return Outcome("missing")
            if StageStatus(row.status).terminal:
                return Outcome("duplicate", row.job_id)
            if row.status == StageStatus.PENDING:
                log.warning("stage run %s is still pending; not dispatched yet", stage_run_id)
                return Outcome("not_dispatched", row.job_id)
            job = session.get(Job, row.job_id)
            assert job is not None
            if JobStatus(job.status).terminal:
                row.status = StageStatus.SKIPPED
                row.skip_reason = f"job_{job.status}"
                row.finished_at = now
                return Outcome("skipped", row.job_id)
            row.attempts += 1
            if row.attempts > row.max_attempts:
                row.status = StageStatus.DEAD
                row.finished_at = now
                row.error = (
                    f"gave up after {row.max_attempts} attempts; last error: "
                    f"{row.error or 'worker lost'}"
                )
                return Outcome("dead", row.job_id, advance=True, error=row.error)
            row.status = StageStatus.RUNNING
            row.started_at = now
            row.deadline_at = now + timedelta(
                seconds=row.time_limit_s + self.settings.dispatch_grace_s
            )
            row.worker_host = self.host
            row.worker_pid = os.getpid()
            row.device = self.device
            row.code_version = self.code_version
            row.celery_task_id = celery_task_id
            if row.dispatched_at is not None:
                row.queue_wait_ms = (now - row.dispatched_at).total_seconds() * 1000
            image = session.get(Image, job.image_sha256) if job.image_sha256 else None
            if image is None or image.working_blob_key is None:
                raise PermanentError(f"job {job.id} has no stored image; resubmit it")
            siblings = {
                s.stage: s for s in session.query(StageRun).filter(StageRun.job_id == job.id)
            }
            image_key = image.working_blob_key
            if row.reads != "original":
                source = siblings[row.reads]
                key = (source.output or {}).get("working_blob_key")
                if not isinstance(key, str):
                    raise PermanentError(
                        f"stage {row.stage} reads the output of {row.reads}, which stored no image"
                    )
                image_key = key
            upstream = {n: dict(siblings[n].output or {}) for n in row.needs}
            return Claim(
                stage_run_id=row.id,
                job_id=job.id,
                stage=row.stage,
                kind=row.kind,
                attempt=row.attempts,
                params=dict(row.params),
                image_key=image_key,
                original_size=(image.width, image.height),
                upstream=upstream,
                idempotency_key=job.idempotency_key,
                priority=job.priority,
            )

    # -- run ----------------------------------------------------------------------------
    def run(self, stage_run_id: int, celery_task_id: str | None = None) -> Outcome:
        started = time.perf_counter()
        try:
            claimed = self.claim(stage_run_id, celery_task_id)
        except PermanentError as exc:
            return self._fail(stage_run_id, None, str(exc), permanent=True)
        if isinstance(claimed, Outcome):
            return claimed
        claim = claimed
        try:
            t0 = time.perf_counter()
            pixels = self.pixels.get(claim.image_key)
            load_ms = (time.perf_counter() - t0) * 1000
            stage_input = StageInput(
                image=pixels,
                original_size=claim.original_size,
                params=claim.params,
                upstream=claim.upstream,
                device=self.device,
            )
            t1 = time.perf_counter()
            result = self.runner(claim.kind)([stage_input])[0]
            compute_ms = (time.perf_counter() - t1) * 1000
            return self._persist(claim, result, load_ms, compute_ms, started)
        except PermanentError as exc:
            return self._fail(stage_run_id, claim, str(exc), permanent=True)
        except TransientError as exc:
            return self._fail(stage_run_id, claim, str(exc), permanent=False)
        except Exception as exc:
            # SoftTimeLimitExceeded lands here too: Celery raises it inside the task.
            name = type(exc).__name__
            if name == "SoftTimeLimitExceeded":
                return self._fail(
                    stage_run_id, claim, "stage exceeded its time limit", permanent=False
                )
            log.exception("stage %s of job %s crashed", claim.stage, claim.job_id)
            return self._fail(
                stage_run_id,
                claim,
                f"internal error in stage {claim.stage}: {name}: {exc}; this is a bug, "
                "please report it with the job id",
                permanent=True,
            )

    def _persist(
        self,
        claim: Claim,
        result: StageOutput | StageSkip,
        load_ms: float,
        compute_ms: float,
        started: float,
    ) -> Outcome:
        blob_key: str | None = None
        output: dict[str, Any] = {}
        if isinstance(result, StageOutput):
            output = dict(result.output)
            if result.passthrough:
                output["working_blob_key"] = claim.image_key
                output["unchanged"] = True
            elif result.image is not None:
                output["working_blob_key"] = self.blobs.put(
                    encode_npy(result.image), "application/x-npy"
                )
                blob_key = self.blobs.put(_viewable_jpeg(result.image), "image/jpeg")
            elif result.blob is not None:
                blob_key = self.blobs.put(
                    result.blob, result.blob_media_type or "application/octet-stream"
                )
            if result.model is not None:
                self.record_model(result.model)
        now = utcnow()
        with session_scope(self.db_url) as session:
            row = lock_stage_run(session, claim.stage_run_id)
            if row is None or StageStatus(row.status).terminal:
                return Outcome("duplicate", claim.job_id, advance=True, priority=claim.priority)
            if row.attempts != claim.attempt:
                log.info(
                    "stage run %s attempt %s finished after attempt %s started; keeping ours",
                    row.id,
                    claim.attempt,
                    row.attempts,
                )
            row.finished_at = now
            row.load_ms = load_ms
            row.compute_ms = compute_ms
            row.total_ms = (time.perf_counter() - started) * 1000
            if isinstance(result, StageSkip):
                row.status = StageStatus.SKIPPED
                row.skip_reason = result.reason
                row.output = {"skipped": result.reason, "detail": result.detail}
                event = EventType.STAGE_SKIPPED
            else:
                row.status = StageStatus.SUCCEEDED
                row.output = output
                row.output_blob_key = blob_key
                if result.model is not None:
                    row.model_name = result.model.get("name")
                    row.model_version = result.model.get("version")
                    row.model_weights_sha256 = result.model.get("weights_sha256")
                session.execute(delete(Detection).where(Detection.stage_run_id == row.id))
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
                event = EventType.STAGE_SUCCEEDED
        self.events.publish(
            event,
            claim.job_id,
            idempotency_key=claim.idempotency_key,
            stage=claim.stage,
            attempt=claim.attempt,
            compute_ms=round(compute_ms, 2),
        )
        return Outcome(str(event), claim.job_id, advance=True, priority=claim.priority)

    def _fail(
        self, stage_run_id: int, claim: Claim | None, error: str, *, permanent: bool
    ) -> Outcome:
        now = utcnow()
        with session_scope(self.db_url) as session:
            row = lock_stage_run(session, stage_run_id)
            if row is None or StageStatus(row.status).terminal:
                return Outcome("duplicate", row.job_id if row else None)
            row.error = error
            row.error_history = [
                *row.error_history,
                {"at": now.isoformat(), "attempt": row.attempts, "error": error},
            ]
            job_id = row.job_id
            retry_in: float | None = None
            if permanent or row.attempts >= row.max_attempts:
                row.status = StageStatus.FAILED if permanent else StageStatus.DEAD
                row.finished_at = now
                status = str(row.status)
            else:
                retry_in = min(
                    self.settings.retry_backoff_s * 2 ** max(row.attempts - 1, 0),
                    self.settings.retry_backoff_max_s,
                )
                row.status = StageStatus.DISPATCHED
                row.dispatched_at = now
                row.deadline_at = now + timedelta(
                    seconds=retry_in + self.settings.dispatch_timeout_s
                )
                status = "retrying"
        if retry_in is not None:
            log.warning(
                "stage run %s failed transiently (%s); retry in %.1f s",
                stage_run_id,
                error,
                retry_in,
            )
            return Outcome(status, job_id, retry_in_s=retry_in, error=error)
        self.events.publish(
            EventType.STAGE_FAILED,
            job_id,
            idempotency_key=claim.idempotency_key if claim else None,
            stage=claim.stage if claim else None,
            status=status,
            error=error,
        )
        priority = claim.priority if claim else None
        return Outcome(status, job_id, advance=True, error=error, priority=priority)
