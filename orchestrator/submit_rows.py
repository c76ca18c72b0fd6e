"""The rows a submission writes: the resolved spec, the images row and its blobs, the
planned stage rows, and the copy of a finished job's results on a cache hit.

Shared by ``orchestrator.submit`` (one transaction per batch of submissions) and the
backfill; nothing here commits or sends anything.
"""

from __future__ import annotations

import copy
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image as PILImage
from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from db.blobs import BlobStore, PendingPuts
from db.models import Image, Job, StageRun, utcnow
from imgpipe.contracts import JobStatus, Priority, StageStatus, queue_for, stage_task_name
from imgpipe.decode import DecodedImage
from imgpipe.stagekinds import STAGE_KINDS
from orchestrator.context import OrchestratorContext
from orchestrator.overrides import check_overrides
from orchestrator.pipelines import PipelineSpec

__all__ = [
    "StoredImage",
    "cache_sources",
    "copy_cached",
    "plan_stages",
    "resolve_spec",
    "store_image",
    "store_image_rows",
    "write_image_blobs",
]

_MEDIA_TYPES = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp"}
_WORKING_COPY_IS_UPLOAD = frozenset({"JPEG", "PNG", "WEBP"})
"""Upload formats whose bytes serve as the working copy (docs/pixels.md); others
(opt-in GIF, TIFF) get a lossless PNG, so workers never need their decoders."""


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
    """The spec as JSON with per-submission overrides (only those the pipeline allows:
    orchestrator/overrides.py) and setting defaults applied."""
    check_overrides(spec, overrides)
    resolved = spec.to_json()
    stages = resolved["stages"]
    for stage_name, params in (overrides or {}).items():
        stages[stage_name]["params"] = _deep_merge(stages[stage_name]["params"], params)
    profile = ctx.settings.anomaly_profile
    for stage in stages.values():
        if stage["kind"] == "anomaly" and profile is not None:
            stage["params"].setdefault("profile", str(profile))
    return resolved


# -- images -------------------------------------------------------------------------------


@dataclass(frozen=True)
class StoredImage:
    """An accepted upload whose blobs are durable: what its images row needs."""

    sha256: str
    decoded: DecodedImage
    size_bytes: int
    blob_key: str
    working_blob_key: str


def write_image_blobs(
    blobs: BlobStore, uploads: Sequence[tuple[str, bytes, DecodedImage]]
) -> tuple[list[StoredImage], PendingPuts]:
    """Start storing each ``(sha256, bytes, decoded)`` upload and its working copy
    (docs/pixels.md): the upload itself for JPEG/PNG/WebP, a PNG (compress level 1)
    otherwise. One ``start_put_many`` for the batch; the caller waits on the returned
    ``PendingPuts`` before it commits a row that names one of them."""
    items: list[tuple[bytes, str]] = []
    for _sha, data, decoded in uploads:
        fmt = decoded.header.format
        items.append((data, _MEDIA_TYPES.get(fmt, "application/octet-stream")))
        if fmt not in _WORKING_COPY_IS_UPLOAD:
            buffer = io.BytesIO()
            PILImage.fromarray(decoded.pixels).save(buffer, format="PNG", compress_level=1)
            items.append((buffer.getvalue(), "image/png"))
    pending = blobs.start_put_many(items)
    keys = iter(pending.keys)
    stored = []
    for sha, data, decoded in uploads:
        blob_key = next(keys)
        working_key = blob_key if decoded.header.format in _WORKING_COPY_IS_UPLOAD else next(keys)
        stored.append(StoredImage(sha, decoded, len(data), blob_key, working_key))
    return stored, pending


def store_image_rows(session: Session, images: Sequence[StoredImage]) -> None:
    """Insert the missing images rows; a row whose working copy was collected
    (``working_blob_key`` NULL) gets the new one. One SELECT for the batch.

    The INSERT is ``ON CONFLICT DO NOTHING``: a concurrent submission of the same bytes
    (under another key) that inserts the row first is not an error; its row serves both
    (on PostgreSQL the INSERT waits for that transaction, then inserts nothing)."""
    wanted = {image.sha256: image for image in images}
    if not wanted:
        return
    rows = session.scalars(select(Image).where(Image.sha256.in_(wanted))).all()
    existing = {row.sha256: row for row in rows}
    missing = []
    for sha, image in wanted.items():
        row = existing.get(sha)
        if row is None:
            header = image.decoded.header
            missing.append(
                {
                    "sha256": sha,
                    "blob_key": image.blob_key,
                    "working_blob_key": image.working_blob_key,
                    "size_bytes": image.size_bytes,
                    "format": header.format,
                    "width": header.width,
                    "height": header.height,
                    "conversions": list(image.decoded.conversions),
                    "first_seen": utcnow(),
                }
            )
        elif row.working_blob_key is None:
            row.working_blob_key = image.working_blob_key
    if missing:
        insert = sqlite_insert if session.get_bind().dialect.name == "sqlite" else pg_insert
        session.execute(insert(Image).on_conflict_do_nothing(index_elements=["sha256"]), missing)


def store_image(
    blobs: BlobStore, session: Session, data: bytes, sha: str, decoded: DecodedImage
) -> None:
    """The images row, the upload's blob and its working copy for one image."""
    stored, pending = write_image_blobs(blobs, [(sha, data, decoded)])
    pending.wait()
    store_image_rows(session, stored)
    session.flush()


# -- stage rows ---------------------------------------------------------------------------


def plan_stages(
    job: Job, resolved: Mapping[str, Any], ctx: OrchestratorContext, priority: Priority
) -> list[StageRun]:
    """One pending stage row per stage of the resolved spec (``job.id`` must be set).
    The columns the DAG step sets on a dispatched row are set here too, so pending and
    dispatched rows insert with one statement."""
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
                dispatch_count=0,
                dispatched_at=None,
                deadline_at=None,
            )
        )
    return rows


def cache_sources(session: Session, wanted: set[tuple[str, str]]) -> dict[tuple[str, str], Job]:
    """The latest succeeded, non-cache-hit job per ``(image_sha256, pipeline_hash)`` in
    ``wanted``: one query for the batch."""
    if not wanted:
        return {}
    jobs = session.scalars(
        select(Job)
        .where(
            Job.image_sha256.in_({sha for sha, _ in wanted}),
            Job.pipeline_hash.in_({p_hash for _, p_hash in wanted}),
            Job.status == JobStatus.SUCCEEDED,
            Job.cache_hit_of.is_(None),
        )
        .order_by(Job.finished_at.desc())
    ).all()
    found: dict[tuple[str, str], Job] = {}
    for job in jobs:
        pair = (job.image_sha256 or "", job.pipeline_hash)
        if pair in wanted:
            found.setdefault(pair, job)
    return found


def copy_cached(session: Session, job: Job, source: Job) -> list[StageRun]:
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
