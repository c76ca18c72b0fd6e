"""Jobs from SQL and their pictures from the blob store -> ``JobView``s for the report."""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from db.blobs import BlobStore
from db.models import Image, Job
from imgpipe.decode import DecodeLimits
from imgpipe.errors import ImgpipeError
from imgpipe.face.report.outputs import apply_stage_outputs, first_of_kind, timings
from imgpipe.face.report.thumbs import heatmap_overlay_uri, thumbnail_uri
from imgpipe.face.report.views import JobView, Picture

__all__ = ["collect_views", "job_ids_since", "parse_duration"]

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d)\s*$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> timedelta:
    """``90s``, ``15m``, ``2h``, ``1.5d`` -> a timedelta; ValueError for anything else."""
    match = _DURATION_RE.match(text)
    if match is None:
        raise ValueError(
            f"--since {text!r} is not a duration; write a number and a unit s, m, h or d "
            "(e.g. 30m, 2h, 1d)"
        )
    return timedelta(seconds=float(match.group(1)) * _UNIT_S[match.group(2)])


def job_ids_since(session: Session, since: timedelta, limit: int) -> list[str]:
    """Ids of the jobs created in the last ``since``, oldest first, at most ``limit``
    (the newest ones when there are more)."""
    cutoff = datetime.now(UTC) - since
    rows = session.execute(
        select(Job.id).where(Job.created_at >= cutoff).order_by(Job.created_at.desc()).limit(limit)
    ).scalars()
    return list(reversed(list(rows)))


def _picture(blobs: BlobStore, key: str | None, limits: DecodeLimits, *, heat: bool) -> Picture:
    if key is None:
        return Picture(missing="not stored")
    try:
        data = blobs.get(key)
        uri = heatmap_overlay_uri(data, limits) if heat else thumbnail_uri(data, limits)
    except ImgpipeError as exc:
        return Picture(missing=f"blob {key} could not be shown: {exc}")
    return Picture(data_uri=uri)


def _view(session: Session, job: Job, blobs: BlobStore, limits: DecodeLimits) -> JobView:
    image = session.get(Image, job.image_sha256) if job.image_sha256 else None
    filename = (job.metadata_json or {}).get("filename")
    view = JobView(
        job_id=job.id,
        title=str(filename) if filename else job.id,
        pipeline=job.pipeline,
        status=job.status,
        verdict=job.verdict,
        reasons=[str(r) for r in job.reasons or []],
        error=job.error,
        width_px=image.width if image else 0,
        height_px=image.height if image else 0,
    )
    rows = list(job.stage_runs)
    apply_stage_outputs(view, rows)
    view.timings = timings(rows, job.created_at)
    if image is None:
        view.original = Picture(missing="no image stored (the input was rejected)")
        return view
    view.original = _picture(blobs, image.blob_key, limits, heat=False)
    enhance = first_of_kind(rows, "enhance")
    if enhance is not None and not (enhance.output or {}).get("unchanged"):
        view.enhanced = _picture(blobs, enhance.output_blob_key, limits, heat=False)
    elif enhance is not None:
        view.enhanced = Picture(missing="enhance changed nothing: same as the original")
    anomaly = first_of_kind(rows, "anomaly")
    if anomaly is not None:
        view.heatmap = _picture(blobs, anomaly.output_blob_key, limits, heat=True)
    return view


def collect_views(
    session: Session, blobs: BlobStore, job_ids: Sequence[str], limits: DecodeLimits
) -> tuple[list[JobView], list[str]]:
    """Views of ``job_ids`` in the given order, and the ids that have no job row."""
    views: list[JobView] = []
    unknown: list[str] = []
    for job_id in dict.fromkeys(job_ids):
        job = session.get(Job, job_id)
        if job is None:
            unknown.append(job_id)
        else:
            views.append(_view(session, job, blobs, limits))
    return views, unknown
