"""The review queue over HTTP (scope ``review``); the console (console.py) is its client.

The reviewer is the API key's name: a decision is stored with the name of the key that
made it, so nobody can decide in someone else's name.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from db.apikeys import ApiKeyInfo, Scope
from db.engine import session_scope
from imgpipe.face.web.auth import require
from imgpipe.face.web.context import WebContext, web_context
from imgpipe.face.web.errors import ApiError, error_responses
from imgpipe.face.web.schemas import (
    JOB_ID_PATTERN,
    TEXT_PATTERN,
    DecisionIn,
    DecisionOut,
    HistoryOut,
    LeaseOut,
    QueueOut,
    ReviewItemOut,
    ReviewNextIn,
)
from orchestrator import review_lease
from orchestrator.review import ReviewError
from orchestrator.review_view import HistoryFilter, review_history, review_item

__all__ = ["router"]

router = APIRouter(prefix="/v1/review", tags=["review"])

Reviewer = Annotated[ApiKeyInfo, Depends(require(Scope.REVIEW))]
Ctx = Annotated[WebContext, Depends(web_context)]
JobId = Annotated[str, Path(pattern=JOB_ID_PATTERN)]
Text = Annotated[str | None, Query(max_length=128, pattern=TEXT_PATTERN)]
MAX_HISTORY_PAGE = 200


def _utc(value: datetime | None) -> datetime | None:
    """A time without a zone is taken as UTC."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)


def _lease_out(lease: review_lease.Lease) -> LeaseOut:
    return LeaseOut(
        job_id=lease.job_id, reviewer=lease.reviewer, expires_at=lease.expires_at.isoformat()
    )


def _item(ctx: WebContext, job_id: str) -> dict[str, Any]:
    with session_scope(ctx.database_url) as session:
        item = review_item(session, job_id)
    if item is None:
        raise ApiError(404, "not_found", f"no job {job_id}")
    return item


def _next(ctx: WebContext, reviewer: str, body: ReviewNextIn) -> ReviewItemOut | None:
    lease = review_lease.take_next(
        ctx.database_url,
        reviewer,
        lease_s=ctx.settings.review_lease_s,
        order=body.order,
        exclude=body.exclude,
        pipeline=body.pipeline,
    )
    if lease is None:
        return None
    item = ReviewItemOut.model_validate(_item(ctx, lease.job_id))
    item.lease = _lease_out(lease)
    return item


@router.post(
    "/next",
    summary="Lease the next waiting job to this reviewer",
    description="Releases the reviewer's earlier lease and leases the next job waiting for "
    "review (oldest first, or by score), for IMGPIPE_REVIEW_LEASE_S. 204: nothing waiting "
    "that this reviewer may take.",
    response_model=ReviewItemOut,
    responses={204: {"description": "The queue is empty."}, **error_responses(401, 403, 503)},
)
async def next_item(body: ReviewNextIn, ctx: Ctx, key: Reviewer) -> Any:
    item = await run_in_threadpool(_next, ctx, key.name, body)
    if item is None:
        return Response(status_code=204)
    return item


@router.get(
    "/items/{job_id}",
    summary="What a reviewer sees of a job (no lease taken)",
    response_model=ReviewItemOut,
    responses=error_responses(401, 403, 404, 503),
)
def get_item(job_id: JobId, ctx: Ctx, _key: Reviewer) -> ReviewItemOut:
    return ReviewItemOut.model_validate(_item(ctx, job_id))


@router.post(
    "/items/{job_id}/lease",
    summary="Renew this reviewer's lease on a job",
    response_model=LeaseOut,
    responses=error_responses(401, 403, 409, 503),
)
def renew_lease(job_id: JobId, ctx: Ctx, key: Reviewer) -> LeaseOut:
    try:
        lease = review_lease.renew(
            ctx.database_url, job_id, key.name, lease_s=ctx.settings.review_lease_s
        )
    except review_lease.LeaseLostError as exc:
        raise ApiError(409, "lease_lost", str(exc)) from None
    return _lease_out(lease)


@router.delete(
    "/items/{job_id}/lease",
    summary="Give the job back to the queue (skip)",
    status_code=204,
    response_class=Response,
    responses=error_responses(401, 403, 409, 503),
)
def release_lease(job_id: JobId, ctx: Ctx, key: Reviewer) -> Response:
    if not review_lease.release(ctx.database_url, job_id, key.name):
        raise ApiError(409, "lease_lost", f"{key.name} holds no lease on job {job_id}")
    return Response(status_code=204)


@router.post(
    "/items/{job_id}/decision",
    summary="Decide a leased job",
    description="Stored once, with the key's name as the reviewer and the time; the "
    "decision becomes the job's verdict and a `reviewed` event. 409: the lease is no longer "
    "this reviewer's, or the job was decided already.",
    response_model=DecisionOut,
    responses=error_responses(400, 401, 403, 404, 409, 503),
)
def decide(job_id: JobId, body: DecisionIn, ctx: Ctx, key: Reviewer) -> DecisionOut:
    try:
        outcome = review_lease.decide_leased(
            ctx.orchestrator, job_id, body.decision, reviewer=key.name, note=body.note
        )
    except review_lease.AlreadyDecidedError as exc:
        raise ApiError(409, "already_decided", str(exc)) from None
    except review_lease.LeaseLostError as exc:
        raise ApiError(409, "lease_lost", str(exc)) from None
    except ReviewError as exc:
        status = 404 if str(exc).startswith("no job") else 400
        raise ApiError(status, "not_found" if status == 404 else "bad_decision", str(exc)) from None
    return DecisionOut(
        job_id=outcome.job_id,
        decision=outcome.decision,
        previous_verdict=outcome.previous_verdict,
        reviewer=outcome.reviewer,
        at=outcome.at.isoformat(),
    )


@router.get(
    "/queue",
    summary="How many jobs wait for review, and how many are on someone's screen",
    response_model=QueueOut,
    responses=error_responses(401, 403, 503),
)
def queue(
    ctx: Ctx,
    key: Reviewer,
    pipeline: Annotated[str | None, Query(max_length=64, pattern=TEXT_PATTERN)] = None,
) -> QueueOut:
    waiting, leased = review_lease.queue_counts(ctx.database_url, pipeline)
    return QueueOut(
        waiting=waiting, leased=leased, lease_s=ctx.settings.review_lease_s, reviewer=key.name
    )


@router.get(
    "/history",
    summary="Decisions, newest first, with filters",
    response_model=HistoryOut,
    responses=error_responses(401, 403, 503),
)
def history(
    ctx: Ctx,
    _key: Reviewer,
    reviewer: Text = None,
    decision: Text = None,
    pipeline: Text = None,
    job_id: Annotated[str | None, Query(pattern=JOB_ID_PATTERN)] = None,
    since: Annotated[datetime | None, Query(description="ISO 8601, inclusive.")] = None,
    until: Annotated[datetime | None, Query(description="ISO 8601, exclusive.")] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_HISTORY_PAGE)] = 50,
    offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
) -> HistoryOut:
    where = HistoryFilter(
        reviewer=reviewer, decision=decision, pipeline=pipeline, job_id=job_id,
        since=_utc(since), until=_utc(until), limit=limit, offset=offset,
    )  # fmt: skip
    with session_scope(ctx.database_url) as session:
        total, items = review_history(session, where)
    return HistoryOut.model_validate({"total": total, "items": items})
