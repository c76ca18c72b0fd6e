"""Collecting working copies that no unfinished job needs (DESIGN principle 7).

Since docs/pixels.md, an upload's working copy is normally the upload itself
(``images.working_blob_key == images.blob_key``) and an image-producing stage's working
copy is its viewable JPEG result: neither is ever collected. What is collected:

* an image's separate working copy (a legacy raw ``.npy``, or the PNG made for a GIF/TIFF
  upload) once no ``queued``/``running`` job reads that image. The row's
  ``working_blob_key`` becomes NULL; the next submission of the image stores a new one;
* a legacy ``.npy`` working copy in a finished job's stage output (enhance before
  docs/pixels.md). The output's ``working_blob_key`` then names the stage's viewable
  image (``output_blob_key``, the same pixels as a JPEG) or is dropped.

A blob is deleted only if, after those updates, no images row and no stage run still
names it (blobs are content-addressed and may be shared). Database changes commit
before any file is deleted, so a crash leaves at worst an unreferenced blob.
Originals, viewable results (enhanced JPEGs, heat maps) are never touched.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Text, cast, exists, or_, select
from sqlalchemy.orm import Session

from db.blobs import BlobStore
from db.engine import session_scope
from db.models import Image, Job, StageRun
from imgpipe.contracts import JobStatus

__all__ = ["GcReport", "collect_working_copies"]

_UNFINISHED = (JobStatus.QUEUED, JobStatus.RUNNING)
_LEGACY_SUFFIX = ".npy"


@dataclass
class GcReport:
    images: int = 0
    """Images rows whose separate working copy was released."""
    stage_outputs: int = 0
    """Finished stage runs whose legacy .npy working copy was released."""
    blobs_deleted: int = 0
    bytes_freed: int = 0
    """With ``dry_run``: the bytes that would be freed."""
    kept_shared: int = 0
    """Released keys still named elsewhere (shared content), so not deleted."""
    keys: list[str] = field(default_factory=list)
    """The deleted keys (with ``dry_run``: those that would be)."""


def _release_images(session: Session, released: set[str]) -> int:
    busy = select(Job.image_sha256).where(Job.status.in_(_UNFINISHED))
    rows = session.scalars(
        select(Image).where(
            Image.working_blob_key.is_not(None),
            Image.working_blob_key != Image.blob_key,
            Image.sha256.not_in(busy.where(Job.image_sha256.is_not(None))),
        )
    )
    count = 0
    for image in rows:
        assert image.working_blob_key is not None
        released.add(image.working_blob_key)
        image.working_blob_key = None
        count += 1
    return count


def _release_outputs(session: Session, released: set[str]) -> int:
    rows = session.scalars(
        select(StageRun)
        .join(Job, Job.id == StageRun.job_id)
        .where(
            Job.status.not_in(_UNFINISHED),
            cast(StageRun.output, Text).like("%working_blob_key%"),
        )
    )
    count = 0
    for run in rows:
        output: dict[str, Any] = dict(run.output or {})
        key = output.get("working_blob_key")
        if not isinstance(key, str) or not (key.endswith(_LEGACY_SUFFIX) or key in released):
            continue
        released.add(key)
        if run.output_blob_key is not None and not output.get("unchanged"):
            output["working_blob_key"] = run.output_blob_key
        else:
            del output["working_blob_key"]
        run.output = output  # a new dict: SQLAlchemy sees the change
        count += 1
    return count


def _still_named(session: Session, key: str) -> bool:
    return bool(
        session.scalar(
            select(
                or_(
                    exists().where(or_(Image.blob_key == key, Image.working_blob_key == key)),
                    exists().where(StageRun.output_blob_key == key),
                    exists().where(cast(StageRun.output, Text).like(f"%{key}%")),
                )
            )
        )
    )


def collect_working_copies(
    database_url: str, blobs: BlobStore, *, dry_run: bool = False
) -> GcReport:
    """Release and delete working copies that no unfinished job needs; see the module."""
    report = GcReport()
    released: set[str] = set()
    with session_scope(database_url) as session:
        report.images = _release_images(session, released)
        session.flush()
        report.stage_outputs = _release_outputs(session, released)
        session.flush()
        doomed = sorted(k for k in released if not _still_named(session, k))
        report.kept_shared = len(released) - len(doomed)
        if dry_run:
            session.rollback()
    report.keys = doomed
    if dry_run:
        report.bytes_freed = sum(blobs.size(key) for key in doomed)
        return report
    for key in doomed:
        freed = blobs.delete(key)
        report.blobs_deleted += 1 if freed else 0
        report.bytes_freed += freed
    return report
