"""GET /v1/jobs/{job_id}/events: server-sent events until the job completes.

The events are read from SQL, not from the ``imgpipe:events`` stream: the handler reads
the job's row and its stage rows every IMGPIPE_API_EVENTS_POLL_S (one indexed query) and
sends what changed. SQL is the source of truth (the stream is best-effort and trimmed at
IMGPIPE_EVENTS_MAXLEN), a watcher that connects late or reconnects gets the current state
at once, and a watcher costs one small query per interval whatever the service's
throughput; reading the shared stream instead would make every watcher read every job's
events to find its own.

Events (``event:`` names, ``data:`` JSON):

* ``state``: first, and whenever anything changes: the job's status, verdict and each
  stage's status;
* ``stage``: one per stage status change (stage, kind, status, attempts, error,
  skip_reason);
* ``completed``: once the job is terminal: the whole job (as GET /v1/jobs/{job_id}); then
  the stream ends. A stream also ends after IMGPIPE_API_EVENTS_MAX_S without
  ``completed``: the client reconnects and gets the current state first.

A comment line (``: keep-alive``) is sent every KEEPALIVE_S so proxies keep the
connection open; a client that went away is noticed at the next send (at most KEEPALIVE_S).
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Depends, Path
from fastapi.responses import StreamingResponse
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from db.apikeys import ApiKeyInfo, Scope
from db.engine import session_scope
from db.models import Job, StageRun
from imgpipe.contracts import JobStatus
from imgpipe.face.web.auth import require
from imgpipe.face.web.context import WebContext, web_context
from imgpipe.face.web.errors import ApiError, error_responses
from imgpipe.face.web.schemas import JOB_ID_PATTERN
from orchestrator.reports import job_report

__all__ = ["router"]

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

KEEPALIVE_S = 15.0
RECONNECT_MS = 2000

_EVENT_SCHEMA = {
    "type": "object",
    "description": "One server-sent event; `data` is JSON.",
    "properties": {
        "event": {"type": "string", "enum": ["state", "stage", "completed"]},
        "data": {"type": "string"},
        "id": {"type": "string"},
        "retry": {"type": "integer"},
    },
}

Snapshot = tuple[str, str | None, tuple[tuple[str, str, str, int, str | None, str | None], ...]]


def _snapshot(database_url: str, job_id: str) -> Snapshot | None:
    """(status, verdict, stages) of the job in one transaction, or None if there is none."""
    with session_scope(database_url) as session:
        job = session.execute(select(Job.status, Job.verdict).where(Job.id == job_id)).first()
        if job is None:
            return None
        stages = session.execute(
            select(
                StageRun.stage, StageRun.kind, StageRun.status, StageRun.attempts,
                StageRun.error, StageRun.skip_reason,
            )
            .where(StageRun.job_id == job_id)
            .order_by(StageRun.position)
        ).all()  # fmt: skip
    return job[0], job[1], tuple((s[0], s[1], s[2], s[3], s[4], s[5]) for s in stages)


def _report(database_url: str, job_id: str) -> dict[str, Any] | None:
    with session_scope(database_url) as session:
        return job_report(session, job_id)


def _event(name: str, data: Any, event_id: int) -> bytes:
    payload = json.dumps(data, separators=(",", ":"), default=str)
    return f"id: {event_id}\nevent: {name}\ndata: {payload}\n\n".encode()


async def _stream(ctx: WebContext, job_id: str) -> AsyncIterator[bytes]:
    yield f"retry: {RECONNECT_MS}\n\n".encode()
    previous: Snapshot | None = None
    event_id = 0
    last_sent = time.monotonic()
    ends_at = last_sent + ctx.settings.api_events_max_s
    while time.monotonic() < ends_at:
        snapshot = await run_in_threadpool(_snapshot, ctx.database_url, job_id)
        if snapshot is None:  # deleted meanwhile
            return
        if snapshot != previous:
            status, verdict, stages = snapshot
            before = {s[0]: s for s in previous[2]} if previous is not None else {}
            for stage in stages:
                if before.get(stage[0]) != stage and (
                    previous is not None or stage[2] != "pending"
                ):
                    event_id += 1
                    yield _event("stage", {
                        "job_id": job_id, "stage": stage[0], "kind": stage[1],
                        "status": stage[2], "attempts": stage[3], "error": stage[4],
                        "skip_reason": stage[5],
                    }, event_id)  # fmt: skip
            event_id += 1
            yield _event("state", {
                "job_id": job_id, "status": status, "verdict": verdict,
                "stages": {s[0]: s[2] for s in stages},
            }, event_id)  # fmt: skip
            last_sent = time.monotonic()
            previous = snapshot
            if JobStatus(status).terminal:
                report = await run_in_threadpool(_report, ctx.database_url, job_id)
                event_id += 1
                yield _event("completed", report, event_id)
                return
        elif time.monotonic() - last_sent >= KEEPALIVE_S:
            yield b": keep-alive\n\n"
            last_sent = time.monotonic()
        await anyio.sleep(ctx.settings.api_events_poll_s)


@router.get(
    "/{job_id}/events",
    summary="Server-sent events until the job completes",
    response_class=StreamingResponse,
    responses={
        200: {
            "content": {"text/event-stream": {"schema": _EVENT_SCHEMA}},
            "description": "Events `state`, `stage` and a final `completed` (the whole job).",
        },
        **error_responses(401, 403, 404, 503),
    },
)
def job_events(
    job_id: Annotated[str, Path(pattern=JOB_ID_PATTERN)],
    ctx: Annotated[WebContext, Depends(web_context)],
    _key: Annotated[ApiKeyInfo, Depends(require(Scope.READ))],
) -> StreamingResponse:
    if _snapshot(ctx.database_url, job_id) is None:
        raise ApiError(404, "not_found", f"no job {job_id}; check the id POST /v1/jobs returned")
    return StreamingResponse(
        _stream(ctx, job_id),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )
