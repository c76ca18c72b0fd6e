"""The body of the Celery task ``imgpipe.submit`` (orchestrator/tasks.py keeps the name).

- Fields are validated by the same parser as every entry point
  (orchestrator/submit_fields.py); a malformed submission gets a ``rejected`` event on
  ``imgpipe:events`` and on its ``reply_to``, like a malformed stream entry.
- A submission without an ``idempotency_key`` gets ``celery:<task id>``: a message
  redelivered after its job committed (the process died before the ack) finds that job.
- A submission whose handling kills the process (an image that crashes the decoder: the
  message is requeued on worker loss, ``task_reject_on_worker_lost``) is not redelivered
  forever: each delivery increments a Redis counter that only a delivery that returns
  clears; after ``IMGPIPE_INGEST_MAX_DELIVERIES`` deaths the submission becomes a
  ``rejected`` job with reason ``crashed_worker`` (orchestrator/poison.py).
"""

from __future__ import annotations

import base64
import binascii
import logging
import time
from collections.abc import Mapping
from typing import Any

import redis

from imgpipe.contracts import EVENTS_STREAM, SUBMIT_CRASHES_PREFIX
from imgpipe.errors import PermanentError, TransientError
from imgpipe.events import EventType, encode_fields
from orchestrator.context import OrchestratorContext
from orchestrator.poison import reject_crashing
from orchestrator.submit import SubmitRequest, submit
from orchestrator.submit_fields import (
    RequestRejectedError,
    SubmitFields,
    build_request,
    check_key,
    check_reply_to,
    rejection_code,
)

__all__ = ["TASK_FIELDS", "TASK_KEY_PREFIX", "handle_submit_task", "parse_task_fields"]

log = logging.getLogger(__name__)

TASK_FIELDS = (
    "image_b64",
    "pipeline",
    "idempotency_key",
    "priority",
    "reply_to",
    "metadata",
    "overrides",
    "force",
)
TASK_KEY_PREFIX = "celery:"
CRASH_COUNTER_TTL_S = 7 * 24 * 3600
_TRUE = {"1", "true", "yes"}
_FALSE = {"", "0", "false", "no"}


def _optional_text(fields: Mapping[str, Any], name: str) -> str | None:
    value = fields.get(name)
    if value is None or isinstance(value, str):
        return value
    raise RequestRejectedError("bad_field", f"{name} must be a string, not {value!r}")


def _force(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    if value is None:
        return False
    raise RequestRejectedError("bad_field", f"force {value!r} must be true or false")


def parse_task_fields(
    ctx: OrchestratorContext, task_id: str, fields: Mapping[str, Any]
) -> SubmitRequest:
    """The task's keyword arguments -> a ``SubmitRequest``, or ``RequestRejectedError``."""
    unknown = sorted(set(fields) - set(TASK_FIELDS))
    if unknown:
        raise RequestRejectedError(
            "unknown_field",
            f"unknown field(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(TASK_FIELDS)}",
        )
    encoded = fields.get("image_b64")
    if not encoded:
        raise RequestRejectedError(
            "missing_image", "send the image bytes base64-encoded in `image_b64`"
        )
    if not isinstance(encoded, str):
        raise RequestRejectedError("bad_field", "image_b64 must be a base64 string")
    if len(encoded) > (ctx.settings.max_bytes // 3 + 1) * 4:
        raise RequestRejectedError(
            "too_many_bytes",
            f"image_b64 decodes to more than {ctx.settings.max_bytes} bytes "
            "(IMGPIPE_MAX_BYTES); send a smaller file",
        )
    try:
        data = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise RequestRejectedError("bad_field", f"image_b64 is not valid base64: {exc}") from None
    submitted = SubmitFields(
        data=data,
        pipeline=_optional_text(fields, "pipeline"),
        idempotency_key=_optional_text(fields, "idempotency_key"),
        priority=_optional_text(fields, "priority"),
        reply_to=_optional_text(fields, "reply_to"),
        metadata=fields.get("metadata"),
        overrides=fields.get("overrides"),
        force=_force(fields.get("force")),
    )
    return build_request(ctx, submitted, source="celery", default_key=f"{TASK_KEY_PREFIX}{task_id}")


def _routing(ctx: OrchestratorContext, fields: Mapping[str, Any]) -> tuple[str | None, str | None]:
    """The key and reply_to of a rejected submission, where they are valid themselves."""
    try:
        key = check_key(fields.get("idempotency_key"))
    except RequestRejectedError:
        key = None
    try:
        reply_to = check_reply_to(fields.get("reply_to"), ctx.settings.reply_to_prefix)
    except RequestRejectedError:
        reply_to = None
    return key, reply_to


def _publish_rejection(
    ctx: OrchestratorContext, task_id: str, fields: Mapping[str, Any], exc: PermanentError
) -> dict[str, Any]:
    key, reply_to = _routing(ctx, fields)
    code = rejection_code(exc)
    log.info("imgpipe.submit %s rejected (%s): %s", task_id, code, exc)
    event = encode_fields(
        {
            "event": str(EventType.REJECTED),
            "job_id": None,
            "idempotency_key": key or f"{TASK_KEY_PREFIX}{task_id}",
            "task_id": task_id,
            "reason": code,
            "error": str(exc),
            "at": time.time(),
        }
    )
    maxlen = ctx.settings.events_maxlen
    try:
        pipe = ctx.events.client.pipeline(transaction=False)
        pipe.xadd(EVENTS_STREAM, event, maxlen=maxlen, approximate=True)  # type: ignore[arg-type]
        if reply_to:
            pipe.xadd(reply_to, event, maxlen=maxlen, approximate=True)  # type: ignore[arg-type]
        pipe.execute()
    except (redis.ConnectionError, redis.TimeoutError, OSError) as err:
        raise TransientError(f"rejection of imgpipe.submit {task_id} not published: {err}") from err
    return {"job_id": None, "status": "rejected", "reason": code, "error": str(exc)}


class CrashCounter:
    """Deliveries of one task id that began and did not return (the process died)."""

    def __init__(self, client: redis.Redis, task_id: str) -> None:
        self.client = client
        self.key = f"{SUBMIT_CRASHES_PREFIX}{task_id}"

    def begin(self) -> int:
        """Count this delivery; returns how many deliveries before it died mid-way."""
        try:
            pipe = self.client.pipeline(transaction=True)
            pipe.incr(self.key)
            pipe.expire(self.key, CRASH_COUNTER_TTL_S)
            count, _ = pipe.execute()
        except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
            raise TransientError(f"cannot count submit deliveries in Redis: {exc}") from exc
        return int(count) - 1

    def end(self) -> None:
        try:
            self.client.delete(self.key)
        except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
            log.warning("crash counter %s not cleared (it expires by itself): %s", self.key, exc)


def handle_submit_task(
    ctx: OrchestratorContext, task_id: str, fields: Mapping[str, Any]
) -> dict[str, Any]:
    """One delivery of ``imgpipe.submit``; see the module docstring."""
    counter = CrashCounter(ctx.events.client, task_id)
    crashes = counter.begin()
    try:
        try:
            request = parse_task_fields(ctx, task_id, fields)
            if crashes >= ctx.settings.ingest_max_deliveries:
                result = reject_crashing(ctx, request, crashes)
            else:
                result = submit(ctx, request)
        except PermanentError as exc:
            return _publish_rejection(ctx, task_id, fields, exc)
        return {
            "job_id": result.job_id,
            "status": result.status,
            "created": result.created,
            "reason": result.reason,
        }
    finally:
        counter.end()
