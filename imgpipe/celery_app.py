"""Celery app factory and the queue map.

The settings here are not optional (DESIGN.md): JSON only, late acks, reject on worker
loss, prefetch 1, a visibility timeout above the longest task time limit, results
ignored (they live in SQL) and the ``priority`` queue order so that each worker drains
its interactive queue before the ``.bulk`` one.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from celery import Celery, Task

from imgpipe.contracts import (
    ADVANCE_TASK,
    CONTROL_QUEUE,
    CPU_QUEUE,
    GPU_QUEUE,
    REAP_TASK,
    SUBMIT_TASK,
    bulk_queue,
)
from imgpipe.errors import TransientError
from imgpipe.retry import RetryPolicy, outage_retry_policy
from imgpipe.settings import Settings

log = logging.getLogger(__name__)

__all__ = ["DELIVERY_SETTINGS", "QUEUES", "RetryingTask", "create_app", "settings_of"]

QUEUES: dict[str, tuple[str, ...]] = {
    "control": (CONTROL_QUEUE, bulk_queue(CONTROL_QUEUE)),
    "cpu": (CPU_QUEUE, bulk_queue(CPU_QUEUE)),
    "gpu": (GPU_QUEUE, bulk_queue(GPU_QUEUE)),
}

_SETTINGS_KEY = "imgpipe_settings"

DELIVERY_SETTINGS: dict[str, Any] = {
    "task_serializer": "json",
    "result_serializer": "json",
    "accept_content": ["json"],
    "result_accept_content": ["json"],
    "task_acks_late": True,
    "task_reject_on_worker_lost": True,
    "worker_prefetch_multiplier": 1,
}
"""JSON only, late acks, reject on worker loss, prefetch 1: how every imgpipe worker
takes messages (also the Celery canvas baseline of ``imgpipe bench``)."""


def visibility_timeout_s(settings: Settings) -> int:
    longest = max(settings.stage_time_limits_s.values(), default=300)
    return max(3600, 2 * (longest + settings.dispatch_grace_s))


def create_app(settings: Settings, include: Sequence[str] = ()) -> Celery:
    app = Celery("imgpipe", broker=settings.effective_broker_url, include=list(include))
    transport_options: dict[str, Any] = {
        "visibility_timeout": visibility_timeout_s(settings),
        "queue_order_strategy": "priority",
        # imgpipe orders work by queue (interactive, then .bulk), never by message
        # priority: one list per queue instead of four halves the Redis calls of a poll.
        "priority_steps": [0],
    }
    app.conf.update(
        **DELIVERY_SETTINGS,
        task_ignore_result=True,
        result_backend=None,
        broker_transport_options=transport_options,
        broker_connection_retry_on_startup=True,
        task_default_queue=CONTROL_QUEUE,
        task_routes={
            ADVANCE_TASK: {"queue": CONTROL_QUEUE},
            SUBMIT_TASK: {"queue": CONTROL_QUEUE},
            REAP_TASK: {"queue": CONTROL_QUEUE},
        },
        task_create_missing_queues=True,
        worker_send_task_events=True,
        # No "task-sent" event: it doubled the cost of every stage message (0.64 vs
        # 0.38 ms per send_task here); Flower lists a task from its "task-received".
        task_send_sent_event=False,
        worker_hijack_root_logger=False,
        enable_utc=True,
        beat_schedule={
            "imgpipe-reaper": {"task": REAP_TASK, "schedule": settings.reaper_interval_s},
        },
        beat_schedule_filename=str(settings.resolved_data_dir / "celerybeat-schedule"),
    )
    app.conf[_SETTINGS_KEY] = settings
    return app


def settings_of(app: Celery) -> Settings:
    settings = app.conf.get(_SETTINGS_KEY)
    if not isinstance(settings, Settings):
        settings = Settings()
        app.conf[_SETTINGS_KEY] = settings
    return settings


class RetryingTask(Task):  # type: ignore[misc]
    """Celery task base: a ``TransientError`` (the database or broker unreachable) retries
    the task after ``retry_policy``'s delay — by default the outage policy of
    imgpipe/retry.py, which never gives up, so an outage of any length acks nothing away
    — and propagates once a policy with a cap gives up. Any other exception propagates at
    once. Use as ``@shared_task(base=RetryingTask)``; a task may set its own
    ``retry_policy`` in the decorator."""

    retry_policy: RetryPolicy | None = None
    max_retries = None
    """The policy is the cap: Celery's own default (3) would end an outage's retries, and
    ``retry(max_retries=None)`` means "the task's default", not "no limit"."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().__call__(*args, **kwargs)
        except TransientError as exc:
            policy = self.retry_policy or outage_retry_policy(settings_of(self.app))
            attempt = int(self.request.retries) + 1
            if policy.gives_up(attempt):
                raise
            delay_s = policy.delay_s(attempt)
            log.warning(
                "%s[%s] failed transiently (try %d): %s; retrying in %.1f s",
                self.name, self.request.id, attempt, exc, delay_s,
            )  # fmt: skip
            raise self.retry(exc=exc, countdown=delay_s) from exc
