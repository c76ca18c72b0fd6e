"""The one retry policy: exponential backoff with full jitter and a cap.

Every path that retries after a transient error asks a ``RetryPolicy`` for its delay:
the control tasks (their Celery base class, ``RetryingTask`` in imgpipe/celery_app.py),
the webhook task (orchestrator/webhooks.py ``webhook_retry_policy``), a stage run's
retries (workers/persist.py, from the ``IMGPIPE_RETRY_BACKOFF_S`` settings), and every
wait through a database or broker outage (``outage_retry_policy``: stage workers in
workers/outage.py, the ingest consumer, the control tasks), which never gives up — the
end of an outage is noticed within the cap, however long it lasted. Full jitter (a
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

__all__ = [
    "Backoff",
    "RetryPolicy",
    "outage_retry_policy",
    "stage_retry_policy",
]


@dataclass(frozen=True)
class RetryPolicy:
    base_s: float
    """Ceiling of the first retry's delay; doubled for each later attempt."""
    cap_s: float
    """No delay is ever longer."""
    max_attempts: int | None
    """Runs in all, the first included: ``max_attempts - 1`` retries at most; None: retry
    for as long as it takes (an outage)."""

    def __post_init__(self) -> None:
        if (
            self.base_s < 0
            or self.cap_s < self.base_s
            or (self.max_attempts is not None and self.max_attempts < 1)
        ):
            raise ValueError(
                f"RetryPolicy needs 0 <= base_s <= cap_s and max_attempts >= 1 (or None), got "
                f"{self}"
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
        return self.max_attempts is not None and attempt >= self.max_attempts


class Backoff:
    """The waits of one run of failures under ``policy``; ``reset`` after a success."""

    def __init__(self, policy: RetryPolicy, rng: random.Random | None = None) -> None:
        self.policy = policy
        self.failures = 0
        self._rng = rng

    def next_s(self) -> float:
        self.failures += 1
        return self.policy.delay_s(self.failures, self._rng)

    def reset(self) -> None:
        self.failures = 0


def outage_retry_policy(settings: Settings) -> RetryPolicy:
    """Waiting out a database or broker outage: ``IMGPIPE_OUTAGE_BACKOFF_S`` doubling up to
    ``IMGPIPE_OUTAGE_BACKOFF_MAX_S``, never giving up (a message or an entry in hand is the
    only copy of its work: it is held, never acked away)."""
    if settings.outage_backoff_max_s < settings.outage_backoff_s:
        raise ValueError(
            "IMGPIPE_OUTAGE_BACKOFF_MAX_S must be >= IMGPIPE_OUTAGE_BACKOFF_S, got "
            f"{settings.outage_backoff_max_s} < {settings.outage_backoff_s}"
        )
    return RetryPolicy(
        base_s=settings.outage_backoff_s, cap_s=settings.outage_backoff_max_s, max_attempts=None
    )


def stage_retry_policy(settings: Settings, max_attempts: int | None = None) -> RetryPolicy:
    """A stage run's retries: ``IMGPIPE_RETRY_BACKOFF_S`` doubling up to
    ``IMGPIPE_RETRY_BACKOFF_MAX_S``, ``max_attempts`` runs (default
    ``IMGPIPE_MAX_ATTEMPTS``; a stage row stores its own)."""
    return RetryPolicy(
        base_s=settings.retry_backoff_s,
        cap_s=max(settings.retry_backoff_max_s, settings.retry_backoff_s),
        max_attempts=max_attempts if max_attempts is not None else settings.max_attempts,
    )
