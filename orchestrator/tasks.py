"""Celery tasks of the control queue: advance, submit, reap, webhook (and the outbox relay
when the worker starts). Bodies stay thin.

A TransientError (the database unreachable) retries ``advance`` and ``submit`` through
their base class, ``RetryingTask`` (imgpipe/celery_app.py), with the outage policy of
imgpipe/retry.py: bounded backoff with jitter and no cap on the number of tries — the
message is the only copy of a Celery submission, so an outage of any length must not ack
it away, and the retry is noticed within seconds of the database's return. (``reap``
needs no retry: beat runs it again.)"""

from __future__ import annotations

import json
import logging
from typing import Any

from celery import Task, shared_task
from celery.signals import worker_ready

from imgpipe.celery_app import RetryingTask, settings_of
from imgpipe.contracts import ADVANCE_TASK, REAP_TASK, SUBMIT_TASK, WEBHOOK_TASK
from imgpipe.errors import ConfigError
from orchestrator.context import OrchestratorContext
from orchestrator.reaper import reap
from orchestrator.relay import relay_outbox

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


@worker_ready.connect
def relay_at_start(sender: Any = None, **_: Any) -> None:
    """When the orchestrator starts, answers that a crashed process committed but never
    published go out at once rather than at the first reaper pass."""
    app = getattr(sender, "app", None)
    if app is not None:
        relay_outbox(OrchestratorContext(settings_of(app), app))


@shared_task(name=ADVANCE_TASK, bind=True, base=RetryingTask)
def advance_task(self: Task, job_id: str) -> None:
    from orchestrator.advance import advance_job

    advance_job(context_for(self), job_id)


@shared_task(name=REAP_TASK, bind=True)
def reap_task(self: Task) -> dict[str, int]:
    from imgpipe.metrics import record_reaper

    counts = reap(context_for(self)).as_dict()
    record_reaper(counts)
    return counts


@shared_task(name=SUBMIT_TASK, bind=True, base=RetryingTask)
def submit_task(self: Task, **fields: Any) -> dict[str, Any]:
    """Celery clients: ``send_task("imgpipe.submit", kwargs={"image_b64": ..., ...},
    queue="imgpipe.control")``. The name ``imgpipe.submit`` is a public contract.

    Fields are those of the submit stream (docs/submitting.md), validated by the same
    parser; ``image_b64`` carries the bytes because Celery messages are JSON. A malformed
    submission is answered with a ``rejected`` event (orchestrator/submit_task.py).
    """
    from orchestrator.submit_task import handle_submit_task

    return handle_submit_task(context_for(self), str(self.request.id), fields)


@shared_task(name=WEBHOOK_TASK, bind=True, acks_late=True, ignore_result=True, max_retries=None)
def webhook_task(self: Task, body: str) -> str:
    """POST one completed event (orchestrator/webhooks.py); retried by
    ``webhook_retry_policy`` (a refused answer is final, so not ``RetryingTask``)."""
    from orchestrator.webhooks import deliver, webhook_retry_policy

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
    policy = webhook_retry_policy(settings)
    if result.retry and not policy.gives_up(attempt):
        delay_s = policy.delay_s(attempt)
        log.warning(
            "webhook for job %s failed (%s), attempt %d of %d; retrying in %.1f s",
            job_id, result.detail, attempt, settings.webhook_max_attempts, delay_s,
        )  # fmt: skip
        # the task has max_retries=None (``retry(max_retries=None)`` would mean Celery's
        # default of 3); WEBHOOK_MAX_ATTEMPTS is the cap, checked above
        raise self.retry(countdown=delay_s)
    log.error(
        "webhook for job %s given up after %d attempt(s): %s; the event is still on the events "
        "stream", job_id, attempt, result.detail,
    )  # fmt: skip
    return "failed"
