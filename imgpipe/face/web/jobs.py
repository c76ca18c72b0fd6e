"""POST /v1/jobs and GET /v1/jobs/{job_id}."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Header, Path, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from db.apikeys import ApiKeyInfo, Scope
from db.engine import session_scope
from imgpipe.contracts import JobStatus
from imgpipe.errors import PermanentError
from imgpipe.face.web.auth import require
from imgpipe.face.web.context import WebContext, web_context
from imgpipe.face.web.errors import ApiError, error_responses
from imgpipe.face.web.schemas import JOB_ID_PATTERN, JobOut, Links, SubmitOut
from imgpipe.face.web.submit_form import OPENAPI_REQUEST_BODY, read_fields, to_request
from orchestrator.ingest_entry import EntryRejectedError, rejection_code
from orchestrator.reports import job_report
from orchestrator.submit import SubmitResult, submit

__all__ = ["router"]

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

JobId = Annotated[str, Path(pattern=JOB_ID_PATTERN, description="The job's uuid.")]


def _links(job_id: str) -> Links:
    return Links(job=f"/v1/jobs/{job_id}", events=f"/v1/jobs/{job_id}/events")


def _submit(ctx: WebContext, fields: dict[bytes, bytes]) -> SubmitResult:
    orchestrator = ctx.orchestrator
    try:
        return submit(orchestrator, to_request(orchestrator, fields))
    except EntryRejectedError as exc:
        raise ApiError(400, exc.code, str(exc)) from None
    except PermanentError as exc:  # unknown pipeline, bad overrides, stage not installed
        raise ApiError(400, rejection_code(exc), str(exc)) from None


@router.post(
    "",
    summary="Submit an image",
    description="multipart/form-data with the image in `image`, or application/json with "
    "`image_ref`; the other fields as in the submit-stream contract. 202: a new job; 200: "
    "the Idempotency-Key named an existing job; 422: the image was rejected (the job exists "
    "with status `rejected` and the reason).",
    status_code=202,
    response_model=SubmitOut,
    responses={
        200: {"model": SubmitOut, "description": "The Idempotency-Key named an existing job."},
        422: {"model": SubmitOut, "description": "The image was rejected (bad or too large)."},
        **error_responses(400, 401, 403, 413, 415, 503),
    },
    openapi_extra={"requestBody": OPENAPI_REQUEST_BODY},
)
async def post_job(
    request: Request,
    ctx: Annotated[WebContext, Depends(web_context)],
    _key: Annotated[ApiKeyInfo, Depends(require(Scope.SUBMIT))],
    idempotency_key: Annotated[
        str | None,
        Header(
            alias="Idempotency-Key",
            description="A retry with the same key returns the same job (never a second one); "
            "1 to 200 characters, checked as the stream's idempotency_key (400 bad_field).",
        ),
    ] = None,
) -> JSONResponse:
    fields = await read_fields(request, idempotency_key)
    result = await run_in_threadpool(_submit, ctx, fields)
    body = SubmitOut(
        job_id=result.job_id,
        status=result.status,
        created=result.created,
        cache_hit=result.cache_hit,
        reason=result.reason,
        links=_links(result.job_id),
    )
    rejected = result.status == JobStatus.REJECTED
    status_code = 422 if rejected else 202 if result.created else 200
    return JSONResponse(
        body.model_dump(), status_code=status_code, headers={"Location": body.links.job}
    )


@router.get(
    "/{job_id}",
    summary="A job: status, stages, verdict, provenance",
    response_model=JobOut,
    responses=error_responses(401, 403, 404, 503),
)
def get_job(
    job_id: JobId,
    ctx: Annotated[WebContext, Depends(web_context)],
    _key: Annotated[ApiKeyInfo, Depends(require(Scope.READ))],
) -> JobOut:
    with session_scope(ctx.database_url) as session:
        report = job_report(session, job_id)
    if report is None:
        raise ApiError(404, "not_found", f"no job {job_id}; check the id POST /v1/jobs returned")
    return JobOut.model_validate(report)
