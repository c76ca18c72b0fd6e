"""GET /v1/images/{sha256}/{original|enhanced|heatmap}: an image and what stages made of it.

``original`` is the upload as stored (content-addressed by its sha256). ``enhanced`` and
``heatmap`` are the outputs of an ``enhance`` / ``anomaly`` stage run on that image: the
given ``job_id``'s, or else the most recently finished one. When enhancement applied
nothing (``output.unchanged``), the original is the enhanced image and is served with
``X-Imgpipe-Unchanged: true``.
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.responses import Response
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from db.apikeys import ApiKeyInfo, Scope
from db.engine import session_scope
from db.models import Image, Job, StageRun
from imgpipe.contracts import StageStatus
from imgpipe.face.web.auth import require
from imgpipe.face.web.context import WebContext, web_context
from imgpipe.face.web.errors import ApiError, error_responses
from imgpipe.face.web.schemas import JOB_ID_PATTERN, SHA256_PATTERN

__all__ = ["router"]

router = APIRouter(prefix="/v1/images", tags=["images"])

Variant = Literal["original", "enhanced", "heatmap"]
_KIND = {"enhanced": "enhance", "heatmap": "anomaly"}
_MEDIA_TYPES = {
    "JPEG": "image/jpeg",
    "PNG": "image/png",
    "WEBP": "image/webp",
    "GIF": "image/gif",
    "TIFF": "image/tiff",
}
_SUFFIX_MEDIA_TYPES = {".jpg": "image/jpeg", ".png": "image/png", ".webp": "image/webp"}


def _media_type_of_key(key: str, fallback: str = "application/octet-stream") -> str:
    for suffix, media_type in _SUFFIX_MEDIA_TYPES.items():
        if key.endswith(suffix):
            return media_type
    return fallback


def _locate(
    ctx: WebContext, sha256: str, variant: Variant, job_id: str | None
) -> tuple[str, str, bool]:
    """(blob key, media type, unchanged) of the wanted image; ApiError 404 if none."""
    with session_scope(ctx.database_url) as session:
        image = session.get(Image, sha256)
        if image is None:
            raise ApiError(404, "not_found", f"no stored image has sha256 {sha256}")
        original = (
            image.blob_key,
            _MEDIA_TYPES.get(image.format.upper(), "application/octet-stream"),
        )
        if variant == "original":
            return original[0], original[1], False
        stmt = (
            select(StageRun.output_blob_key, StageRun.output)
            .join(Job, Job.id == StageRun.job_id)
            .where(
                Job.image_sha256 == sha256,
                StageRun.kind == _KIND[variant],
                StageRun.status == StageStatus.SUCCEEDED,
            )
            .order_by(StageRun.finished_at.desc(), StageRun.id.desc())
            .limit(1)
        )
        if job_id is not None:
            stmt = stmt.where(Job.id == job_id)
        row = session.execute(stmt).first()
    if row is None:
        which = f"job {job_id}" if job_id else "any job"
        raise ApiError(
            404,
            "not_found",
            f"no {_KIND[variant]} stage of {which} on image {sha256} has succeeded, so there "
            f"is no {variant} image; run a pipeline with an {_KIND[variant]} stage on it",
        )
    key, output = row
    if key:
        return key, _media_type_of_key(key), False
    if variant == "enhanced" and (output or {}).get("unchanged"):
        return original[0], original[1], True
    raise ApiError(404, "not_found", f"the {_KIND[variant]} stage stored no {variant} image")


@router.get(
    "/{sha256}/{variant}",
    summary="The original image, its enhanced copy or its anomaly heat map",
    response_class=Response,
    responses={
        200: {
            "content": {
                "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
                "image/png": {"schema": {"type": "string", "format": "binary"}},
                "image/webp": {"schema": {"type": "string", "format": "binary"}},
            },
            "description": "The image bytes.",
        },
        304: {"description": "Not modified (If-None-Match matched the ETag)."},
        **error_responses(401, 403, 404, 503),
    },
)
async def get_image(
    sha256: Annotated[str, Path(pattern=SHA256_PATTERN)],
    variant: Variant,
    request: Request,
    ctx: Annotated[WebContext, Depends(web_context)],
    _key: Annotated[ApiKeyInfo, Depends(require(Scope.READ, Scope.REVIEW))],
    job_id: Annotated[
        str | None,
        Query(
            pattern=JOB_ID_PATTERN, description="Whose enhance/anomaly output (default: latest)."
        ),
    ] = None,
) -> Response:
    key, media_type, unchanged = await run_in_threadpool(_locate, ctx, sha256, variant, job_id)
    etag = f'"{key.rsplit("/", 1)[-1]}"'
    headers = {"ETag": etag, "Cache-Control": "private, max-age=3600"}
    if unchanged:
        headers["X-Imgpipe-Unchanged"] = "true"
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers=headers)
    data = await run_in_threadpool(ctx.orchestrator.blobs.get, key)
    return Response(data, media_type=media_type, headers=headers)
