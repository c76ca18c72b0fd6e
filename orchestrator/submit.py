"""Accepting one image: validate, store, plan, dispatch.

Used by the Python API, the CLI, the ``imgpipe.submit`` Celery task and the Redis
stream consumer, so every entry point behaves the same.
"""

from __future__ import annotations

import copy
import io
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from PIL import Image as PILImage
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from db.blobs import sha256_bytes
from db.dag import completed_payload, step
from db.engine import session_scope
from db.models import Image, Job, StageRun, utcnow
from imgpipe.aftercommit import AfterCommit
from imgpipe.contracts import JobStatus, Priority, StageStatus, queue_for, stage_task_name
from imgpipe.decode import DecodedImage, DecodeLimits, decode_image
from imgpipe.errors import ImageRejectedError, PermanentError
from imgpipe.events import EventType
from imgpipe.stagekinds import STAGE_KINDS
from orchestrator.advance import deliver_after_commit
from orchestrator.context import OrchestratorContext
from orchestrator.pipelines import PipelineSpec, load_pipeline, pipeline_hash

__all__ = ["SubmitRequest", "SubmitResult", "resolve_spec", "submit"]

log = logging.getLogger(__name__)

_MEDIA_TYPES = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp"}


@dataclass(frozen=True)
class SubmitRequest:
    data: bytes
    pipeline: str
    priority: Priority = Priority.INTERACTIVE
    idempotency_key: str | None = None
    source: str = "api"
    metadata: Mapping[str, Any] | None = None
    overrides: Mapping[str, Mapping[str, Any]] | None = None
    reply_to: str | None = None
    force: bool = False


@dataclass(frozen=True)
class SubmitResult:
    job_id: str
    status: str
    created: bool
    """False when the idempotency key matched an existing job."""
    cache_hit: bool = False
    reason: str | None = None


def _deep_merge(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(copy.deepcopy(base))
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def resolve_spec(
    ctx: OrchestratorContext,
    spec: PipelineSpec,
    overrides: Mapping[str, Mapping[str, Any]] | None,
) -> dict[str, Any]:
    """The spec as JSON with per-submission overrides and setting defaults applied."""
    resolved = spec.to_json()
    stages = resolved["stages"]
    for stage_name, params in (overrides or {}).items():
        if stage_name not in stages:
            raise PermanentError(
                f"overrides name stage {stage_name!r}, which pipeline {spec.name!r} does not "
                f"have (stages: {', '.join(stages)})"
            )
        if not isinstance(params, Mapping):
            raise PermanentError(f"overrides.{stage_name} must be an object of parameters")
        stages[stage_name]["params"] = _deep_merge(stages[stage_name]["params"], params)
    profile = ctx.settings.anomaly_profile
    for stage in stages.values():
        if stage["kind"] == "anomaly" and profile is not None:
            stage["params"].setdefault("profile", str(profile))
    return resolved


_WORKING_COPY_IS_UPLOAD = frozenset({"JPEG", "PNG", "WEBP"})
"""Upload formats whose bytes serve as the working copy (docs/pixels.md); others
(opt-in GIF, TIFF) get a lossless PNG, so workers never need their decoders."""


def _store_image(
    ctx: OrchestratorContext, session: Session, data: bytes, sha: str, decoded: DecodedImage
) -> None:
    """The images row, the upload's blob and its working copy (docs/pixels.md): the upload
    itself for JPEG/PNG/WebP, a PNG (compress level 1) otherwise. A row whose working copy
    was collected (``working_blob_key`` NULL) gets a new one."""
    image = session.get(Image, sha)
    if image is not None and image.working_blob_key is not None:
        return
    header = decoded.header
    blob_key = ctx.blobs.put(data, _MEDIA_TYPES.get(header.format, "application/octet-stream"))
    if header.format in _WORKING_COPY_IS_UPLOAD:
        working_key = blob_key
    else:
        buffer = io.BytesIO()
        PILImage.fromarray(decoded.pixels).save(buffer, format="PNG", compress_level=1)
        working_key = ctx.blobs.put(buffer.getvalue(), "image/png")
    if image is not None:
        image.working_blob_key = working_key
        session.flush()
        return
    session.add(
        Image(
            sha256=sha,
            blob_key=blob_key,
            working_blob_key=working_key,
            size_bytes=len(data),
            format=header.format,
            width=header.width,
            height=header.height,
            conversions=list(decoded.conversions),
        )
    )
    session.flush()


def _plan(
    job: Job, resolved: Mapping[str, Any], ctx: OrchestratorContext, priority: Priority
) -> list[StageRun]:
    rows = []
    for position, (name, stage) in enumerate(resolved["stages"].items()):
        kind = STAGE_KINDS[stage["kind"]]
        rows.append(
            StageRun(
                job_id=job.id,
                stage=name,
                kind=kind.name,
                position=position,
                task_name=stage_task_name(kind.name),
                queue=queue_for(kind.queue, priority),
                needs=list(stage["needs"]),
                reads=stage["reads"],
                gate=stage["gate"],
                status=StageStatus.PENDING,
                max_attempts=ctx.settings.max_attempts,
                time_limit_s=ctx.settings.stage_time_limit_s(kind.name),
                params=stage["params"],
            )
        )
    return rows


def _find_by_key(session: Session, key: str) -> Job | None:
    return session.execute(select(Job).where(Job.idempotency_key == key)).scalar_one_or_none()


def _copy_cached(session: Session, job: Job, source: Job) -> list[StageRun]:
    """Reuse a finished job's results: same stage outputs, verdict and reasons."""
    now = utcnow()
    rows: list[StageRun] = []
    for old in source.stage_runs:
        rows.append(
            StageRun(
                job_id=job.id,
                stage=old.stage,
                kind=old.kind,
                position=old.position,
                task_name=old.task_name,
                queue=old.queue,
                needs=old.needs,
                reads=old.reads,
                gate=old.gate,
                status=old.status,
                attempts=0,
                max_attempts=old.max_attempts,
                time_limit_s=old.time_limit_s,
                params=old.params,
                output=old.output,
                output_blob_key=old.output_blob_key,
                skip_reason=old.skip_reason,
                model_name=old.model_name,
                model_version=old.model_version,
                model_weights_sha256=old.model_weights_sha256,
                worker_host=old.worker_host,
                device=old.device,
                code_version=old.code_version,
                finished_at=now,
            )
        )
    session.add_all(rows)
    job.status = source.status
    job.verdict = source.verdict
    job.reasons = source.reasons
    job.cache_hit_of = source.id
    job.started_at = now
    job.finished_at = now
    return rows


def submit(ctx: OrchestratorContext, request: SubmitRequest) -> SubmitResult:
    """Create (or find) the job for one image. Raises PermanentError for a bad request
    (unknown pipeline, bad overrides); a bad *image* becomes a ``rejected`` job."""
    if request.idempotency_key:
        with session_scope(ctx.database_url) as session:
            existing = _find_by_key(session, request.idempotency_key)
            if existing is not None:
                return SubmitResult(existing.id, existing.status, created=False)
    spec = load_pipeline(request.pipeline, ctx.settings.pipelines_dir)
    spec.require_installed()
    resolved = resolve_spec(ctx, spec, request.overrides)
    p_hash = pipeline_hash(resolved)
    sha = sha256_bytes(request.data)
    rejection: ImageRejectedError | None = None
    decoded: DecodedImage | None = None
    try:
        decoded = decode_image(request.data, DecodeLimits.from_settings(ctx.settings))
    except ImageRejectedError as exc:
        rejection = exc
    job = Job(
        created_at=utcnow(),
        input_sha256=sha,
        pipeline=spec.name,
        pipeline_hash=p_hash,
        pipeline_spec=resolved,
        status=JobStatus.QUEUED,
        priority=str(request.priority),
        source=request.source,
        idempotency_key=request.idempotency_key,
        metadata_json=dict(request.metadata or {}),
        overrides={k: dict(v) for k, v in (request.overrides or {}).items()},
        reply_to=request.reply_to,
    )
    cached_payload: dict[str, Any] | None = None
    try:
        with session_scope(ctx.database_url) as session:
            if rejection is not None:
                job.status = JobStatus.REJECTED
                job.error = str(rejection)
                job.reasons = [rejection.code]
                job.finished_at = utcnow()
                session.add(job)
                session.flush()
                outcome = None
            else:
                assert decoded is not None
                _store_image(ctx, session, request.data, sha, decoded)
                job.image_sha256 = sha
                session.add(job)
                session.flush()
                previous = None
                if not request.force:
                    previous = session.execute(
                        select(Job)
                        .where(
                            Job.image_sha256 == sha,
                            Job.pipeline_hash == p_hash,
                            Job.status == JobStatus.SUCCEEDED,
                            Job.cache_hit_of.is_(None),
                        )
                        .order_by(Job.finished_at.desc())
                        .limit(1)
                    ).scalar_one_or_none()
                if previous is not None:
                    cached_payload = completed_payload(job, _copy_cached(session, job, previous))
                    outcome = None
                else:
                    rows = _plan(job, resolved, ctx, request.priority)
                    session.add_all(rows)
                    session.flush()
                    outcome = step(job, rows, utcnow(), ctx.settings.dispatch_timeout_s)
            job_id, status = job.id, job.status
    except IntegrityError:
        if not request.idempotency_key:
            raise
        with session_scope(ctx.database_url) as session:
            existing = _find_by_key(session, request.idempotency_key)
            assert existing is not None
            return SubmitResult(existing.id, existing.status, created=False)
    after = AfterCommit(dispatches=list(outcome.dispatches) if outcome is not None else [])
    if rejection is not None:
        after.event(
            EventType.REJECTED,
            job_id,
            idempotency_key=request.idempotency_key,
            reply_to=request.reply_to,
            reason=rejection.code,
            error=str(rejection),
        )
        deliver_after_commit(ctx, after)
        return SubmitResult(job_id, status, created=True, reason=str(rejection))
    after.event(
        EventType.ACCEPTED,
        job_id,
        idempotency_key=request.idempotency_key,
        pipeline=spec.name,
        image_sha256=sha,
    )
    if cached_payload is not None:
        after.completed(
            job_id,
            cached_payload,
            request.idempotency_key,
            request.reply_to,
            webhook=bool(ctx.settings.webhook_url),
        )
    deliver_after_commit(ctx, after)
    return SubmitResult(job_id, status, created=True, cache_hit=cached_payload is not None)
