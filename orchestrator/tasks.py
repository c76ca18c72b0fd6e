"""Celery tasks of the control queue: advance, submit, reap, webhook. Bodies stay thin.

A TransientError (the database unreachable) retries ``advance`` and ``submit`` with
bounded backoff and jitter (``outage_backoff_s`` .. ``outage_backoff_max_s``) and no cap
on the number of tries: the message is the only copy of a Celery submission, so an
outage of any length must not ack it away; the retry is noticed within seconds of the
database's return. (``reap`` needs no retry: beat runs it again.)"""

from __future__ import annotations

import base64
import binascii
import json
import logging
from typing import Any, NoReturn

from celery import Task, shared_task

from imgpipe.backoff import backoff_delay_s
from imgpipe.celery_app import settings_of
from imgpipe.contracts import ADVANCE_TASK, REAP_TASK, SUBMIT_TASK, WEBHOOK_TASK, Priority
from imgpipe.errors import ConfigError, PermanentError, TransientError
from orchestrator.context import OrchestratorContext
from orchestrator.reaper import reap
from orchestrator.submit import SubmitRequest, submit

__all__ = ["advance_task", "reap_task", "submit_task", "webhook_task"]

log = logging.getLogger(__name__)

_contexts: dict[int, OrchestratorContext] = {}


def context_for(task: Task) -> OrchestratorContext:
    app = task.app
    ctx = _contexts.get(id(app))
    if ctx is None:
        ctx = OrchestratorContext(settings_of(app), app)
        _contexts[id(app)] = ctx
    return ctx


def retry_transient(task: Task, exc: TransientError) -> NoReturn:
    """Retry ``task`` after a bounded, jittered backoff; never give up on an outage (the
    task is declared with ``max_retries=None``: ``retry(max_retries=None)`` would mean the
    task's default, 3)."""
    settings = settings_of(task.app)
    delay_s = backoff_delay_s(
        task.request.retries, settings.outage_backoff_s, settings.outage_backoff_max_s
    )
    log.warning(
        "%s[%s] failed transiently (try %d): %s; retrying in %.1f s",
        task.name, task.request.id, task.request.retries + 1, exc, delay_s,
    )  # fmt: skip
    raise task.retry(exc=exc, countdown=delay_s)


@shared_task(name=ADVANCE_TASK, bind=True, max_retries=None)
def advance_task(self: Task, job_id: str) -> None:
    from orchestrator.advance import advance_job

    try:
        advance_job(context_for(self), job_id)
    except TransientError as exc:
        retry_transient(self, exc)


@shared_task(name=REAP_TASK, bind=True)
def reap_task(self: Task) -> dict[str, int]:
    from imgpipe.metrics import record_reaper

    counts = reap(context_for(self)).as_dict()
    record_reaper(counts)
    return counts


@shared_task(name=SUBMIT_TASK, bind=True, max_retries=None)
def submit_task(self: Task, **fields: Any) -> dict[str, Any]:
    """Celery clients: ``send_task("imgpipe.submit", kwargs={"image_b64": ..., ...},
    queue="imgpipe.control")``. The name ``imgpipe.submit`` is a public contract.

    Fields are those of the submit stream (docs/submitting.md); ``image_b64`` carries the
    bytes because Celery messages are JSON.
    """
    try:
        data = base64.b64decode(fields.pop("image_b64", ""), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise PermanentError(f"image_b64 is not valid base64: {exc}") from exc
    request = SubmitRequest(
        data=data,
        pipeline=str(fields.pop("pipeline", settings_of(self.app).default_pipeline)),
        priority=Priority(fields.pop("priority", Priority.INTERACTIVE)),
        idempotency_key=fields.pop("idempotency_key", None),
        source="celery",
        metadata=fields.pop("metadata", None),
        overrides=fields.pop("overrides", None),
        reply_to=fields.pop("reply_to", None),
        force=bool(fields.pop("force", False)),
    )
    if fields:
        raise PermanentError(f"unknown submit field(s): {', '.join(sorted(fields))}")
    try:
        result = submit(context_for(self), request)
    except TransientError as exc:
        retry_transient(self, exc)
    return {"job_id": result.job_id, "status": result.status, "created": result.created}


@shared_task(name=WEBHOOK_TASK, bind=True, acks_late=True, ignore_result=True)
def webhook_task(self: Task, body: str) -> str:
    """POST one completed event (orchestrator/webhooks.py); retried with backoff."""
    from orchestrator.webhooks import deliver, retry_delay_s

    settings = settings_of(self.app)
    job_id = json.loads(body).get("job_id")
    try:
        result = deliver(settings, body)
    except ConfigError as exc:
        log.error("webhook for job %s not sent: %s", job_id, exc)
        return "misconfigured"
    if result.delivered:
        return "delivered"
    attempt = self.request.retries + 1
    if result.retry and attempt < settings.webhook_max_attempts:
        delay_s = retry_delay_s(settings, attempt)
        log.warning(
            "webhook for job %s failed (%s), attempt %d of %d; retrying in %.1f s",
            job_id, result.detail, attempt, settings.webhook_max_attempts, delay_s,
        )  # fmt: skip
        raise self.retry(countdown=delay_s, max_retries=None)
    log.error(
        "webhook for job %s given up after %d attempt(s): %s; the event is still on the events "
        "stream", job_id, attempt, result.detail,
    )  # fmt: skip
    return "failed"
