"""Names shared by every process: queues, task names, stream keys, states.

Producers and consumers meet only through these strings, so they live in one place.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Final

__all__ = [
    "ADVANCE_TASK",
    "CONTROL_QUEUE",
    "CPU_QUEUE",
    "EVENTS_STREAM",
    "GPU_QUEUE",
    "MAX_REPLY_TO_CHARS",
    "REAP_TASK",
    "REPLY_PREFIX",
    "SUBMIT_CRASHES_PREFIX",
    "SUBMIT_DEAD_STREAM",
    "SUBMIT_FAILURES_KEY",
    "SUBMIT_GROUP",
    "SUBMIT_STREAM",
    "SUBMIT_TASK",
    "SUBMIT_TRIMMED_KEY",
    "WEBHOOK_TASK",
    "JobStatus",
    "Priority",
    "StageStatus",
    "bulk_queue",
    "queue_for",
    "reply_to_problem",
    "stage_task_name",
]

# Celery queues. Each has a ".bulk" sibling consumed after it (queue_order_strategy).
CONTROL_QUEUE: Final = "imgpipe.control"
CPU_QUEUE: Final = "imgpipe.cpu"
GPU_QUEUE: Final = "imgpipe.gpu"

# Celery task names (the only coupling between orchestrator and workers).
ADVANCE_TASK: Final = "imgpipe.advance"
SUBMIT_TASK: Final = "imgpipe.submit"
REAP_TASK: Final = "imgpipe.reap"
WEBHOOK_TASK: Final = "imgpipe.webhook"
STAGE_TASK_PREFIX: Final = "imgpipe.stage."

# Redis streams.
SUBMIT_STREAM: Final = "imgpipe:submit"
SUBMIT_GROUP: Final = "imgpipe"
SUBMIT_DEAD_STREAM: Final = "imgpipe:submit:dead"
SUBMIT_FAILURES_KEY: Final = "imgpipe:submit:failures"
"""Hash: submit entry id -> the last transient error, the reason given if it dead-letters."""
SUBMIT_CRASHES_PREFIX: Final = "imgpipe:submit:crashes:"
"""Counter per ``imgpipe.submit`` task id: deliveries that began and never finished (the
process died); past ``IMGPIPE_INGEST_MAX_DELIVERIES`` the submission is rejected."""
SUBMIT_TRIMMED_KEY: Final = "imgpipe:submit:trimmed_unread"
"""Counter: submit-stream entries trimmed (MAXLEN) before any consumer read them."""
EVENTS_STREAM: Final = "imgpipe:events"
REPLY_PREFIX: Final = "imgpipe:reply:"
"""Default namespace of ``reply_to`` streams (setting ``IMGPIPE_REPLY_TO_PREFIX``): a
submitter names a stream under it and imgpipe writes nowhere else on its behalf."""
MAX_REPLY_TO_CHARS: Final = 200


def reply_to_problem(name: str, prefix: str = REPLY_PREFIX) -> str | None:
    """Why ``name`` cannot be a ``reply_to`` stream, or None when it can."""
    if not name.startswith(prefix) or len(name) == len(prefix):
        return (
            f"reply_to {name[:MAX_REPLY_TO_CHARS]!r} must be a stream name under {prefix!r} "
            f"(e.g. {prefix}my-service): imgpipe writes replies only in its own namespace"
        )
    if len(name) > MAX_REPLY_TO_CHARS:
        return f"reply_to must be at most {MAX_REPLY_TO_CHARS} characters"
    return None


class Priority(StrEnum):
    INTERACTIVE = "interactive"
    BULK = "bulk"


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    REJECTED = "rejected"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self not in (JobStatus.QUEUED, JobStatus.RUNNING)


class StageStatus(StrEnum):
    PENDING = "pending"
    DISPATCHED = "dispatched"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    SKIPPED = "skipped"
    DEAD = "dead"

    @property
    def terminal(self) -> bool:
        return self in (
            StageStatus.SUCCEEDED,
            StageStatus.FAILED,
            StageStatus.SKIPPED,
            StageStatus.DEAD,
        )


def stage_task_name(kind: str) -> str:
    return f"{STAGE_TASK_PREFIX}{kind}"


def bulk_queue(queue: str) -> str:
    return f"{queue}.bulk"


def queue_for(base_queue: str, priority: Priority) -> str:
    return bulk_queue(base_queue) if priority is Priority.BULK else base_queue
