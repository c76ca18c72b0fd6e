"""The one retry policy (imgpipe/retry.py) and how retrying paths use it."""

from __future__ import annotations

import random

import pytest
import torch
from celery.exceptions import SoftTimeLimitExceeded

from imgpipe.celery_app import RetryingTask
from imgpipe.retry import RetryPolicy, outage_retry_policy, stage_retry_policy
from imgpipe.settings import Settings
from orchestrator.webhooks import webhook_retry_policy
from workers.claims import Claim
from workers.compute import failure_of, is_cuda_oom


def test_ceiling_doubles_from_the_base_up_to_the_cap() -> None:
    policy = RetryPolicy(base_s=0.5, cap_s=3.0, max_attempts=5)
    assert [policy.ceiling_s(a) for a in range(1, 6)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert policy.ceiling_s(10_000) == 3.0


def test_delay_is_full_jitter_below_the_ceiling() -> None:
    policy = RetryPolicy(base_s=1.0, cap_s=30.0, max_attempts=10)
    rng = random.Random(7)
    draws = [policy.delay_s(4, rng) for _ in range(2000)]
    assert all(0.0 <= d <= 8.0 for d in draws)
    # spread over the whole range, not bunched at the ceiling
    assert min(draws) < 0.5 and max(draws) > 7.5
    assert 3.5 < sum(draws) / len(draws) < 4.5


def test_gives_up_after_max_attempts_runs() -> None:
    policy = RetryPolicy(base_s=1.0, cap_s=1.0, max_attempts=3)
    assert [policy.gives_up(a) for a in (1, 2, 3)] == [False, False, True]
    with pytest.raises(ValueError, match="max_attempts >= 1"):
        RetryPolicy(base_s=1.0, cap_s=1.0, max_attempts=0)


def test_paths_take_their_policy_from_the_settings() -> None:
    settings = Settings(retry_backoff_s=0.2, retry_backoff_max_s=5.0, max_attempts=4)
    assert stage_retry_policy(settings) == RetryPolicy(0.2, 5.0, 4)
    assert stage_retry_policy(settings, max_attempts=2).max_attempts == 2
    webhook = webhook_retry_policy(settings)
    assert (webhook.base_s, webhook.cap_s) == (0.2, 5.0)
    assert webhook.max_attempts == settings.webhook_max_attempts
    # control tasks wait out an outage for as long as it lasts (a message in hand is the
    # only copy of a Celery submission); Celery's own retry cap is off for them
    assert RetryingTask.retry_policy is None and RetryingTask.max_retries is None
    outage = outage_retry_policy(settings)
    assert (outage.base_s, outage.cap_s) == (
        settings.outage_backoff_s,
        settings.outage_backoff_max_s,
    )
    assert not outage.gives_up(10**6)


def test_time_limit_and_device_oom_are_recognised_by_type() -> None:
    claim = Claim(1, "j", "detect", "detect", 1, {}, "k", (1, 1), {}, None)
    limit = failure_of(claim, SoftTimeLimitExceeded())
    assert not limit.permanent and "time limit" in limit.error

    class SoftTimeLimitExceededLookalike(Exception):
        pass

    SoftTimeLimitExceededLookalike.__name__ = "SoftTimeLimitExceeded"
    lookalike = failure_of(claim, SoftTimeLimitExceededLookalike())
    assert lookalike.permanent and "internal error" in lookalike.error
    assert is_cuda_oom(torch.cuda.OutOfMemoryError("out of memory"))
    assert not is_cuda_oom(type("OutOfMemoryError", (Exception,), {})())
