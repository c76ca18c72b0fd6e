"""The one retry policy: exponential backoff with full jitter and a cap.

Every path that retries after a transient error asks a ``RetryPolicy`` for its delay:
the control tasks (their Celery base class, ``RetryingTask`` in imgpipe/celery_app.py),
the webhook task (orchestrator/webhooks.py ``webhook_retry_policy``), and a stage run's
retries (workers/persist.py, from the ``IMGPIPE_RETRY_BACKOFF_S`` settings). Full jitter (a
uniform draw between 0 and the exponential ceiling) spreads the retries of many jobs that
failed together — a database restart — instead of sending them back in one wave.

The reaper's dispatch deadlines use ``ceiling_s`` without jitter: a deadline is when to
look again, not a retry (db/dag.py ``mark_dispatched``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from imgpipe.settings import Settings

__all__ = ["CONTROL_TASK_RETRY", "RetryPolicy", "stage_retry_policy"]


@dataclass(frozen=True)
class RetryPolicy:
    base_s: float
    """Ceiling of the first retry's delay; doubled for each later attempt."""
    cap_s: float
    """No delay is ever longer."""
    max_attempts: int
    """Runs in all, the first included: ``max_attempts - 1`` retries at most."""

    def __post_init__(self) -> None:
        if self.base_s < 0 or self.cap_s < 0 or self.max_attempts < 1:
            raise ValueError(
                f"RetryPolicy needs base_s >= 0, cap_s >= 0 and max_attempts >= 1, got {self}"
            )

    def ceiling_s(self, attempt: int) -> float:
        """``min(cap, base * 2 ** (attempt - 1))``: the longest delay after ``attempt``
        (1 = the first run) failed."""
        exponent = min(max(attempt - 1, 0), 62)
        return float(min(self.cap_s, self.base_s * 2.0**exponent))

    def delay_s(self, attempt: int, rng: random.Random | None = None) -> float:
        """Full jitter: uniform in ``[0, ceiling_s(attempt)]``."""
        return (rng or random).uniform(0.0, self.ceiling_s(attempt))

    def gives_up(self, attempt: int) -> bool:
        """Whether no run follows a failure of run number ``attempt``."""
        return attempt >= self.max_attempts


CONTROL_TASK_RETRY = RetryPolicy(base_s=1.0, cap_s=30.0, max_attempts=11)
"""advance and submit on the control queue: a database or broker outage of up to a few
minutes is ridden out; after that the reaper (advance) or the submitter (submit) takes
over."""


def stage_retry_policy(settings: Settings, max_attempts: int | None = None) -> RetryPolicy:
    """A stage run's retries: ``IMGPIPE_RETRY_BACKOFF_S`` doubling up to
    ``IMGPIPE_RETRY_BACKOFF_MAX_S``, ``max_attempts`` runs (default
    ``IMGPIPE_MAX_ATTEMPTS``; a stage row stores its own)."""
    return RetryPolicy(
        base_s=settings.retry_backoff_s,
        cap_s=settings.retry_backoff_max_s,
        max_attempts=max_attempts if max_attempts is not None else settings.max_attempts,
    )
