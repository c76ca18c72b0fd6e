"""Waiting out an outage (imgpipe/retry.py ``Backoff`` under ``outage_retry_policy``)."""

from __future__ import annotations

import random

import pytest

from imgpipe.retry import Backoff, outage_retry_policy
from imgpipe.settings import Settings


def test_outage_waits_are_jittered_capped_and_never_give_up() -> None:
    policy = outage_retry_policy(Settings(outage_backoff_s=0.5, outage_backoff_max_s=4.0))
    backoff = Backoff(policy, random.Random(1))
    waits = [backoff.next_s() for _ in range(1000)]
    assert all(0.0 <= w <= 4.0 for w in waits)
    assert len(set(waits)) > 100, "jittered: processes that failed together spread out"
    assert not policy.gives_up(10**6)


def test_backoff_resets_after_a_success() -> None:
    backoff = Backoff(outage_retry_policy(Settings()), random.Random(2))
    for _ in range(6):
        backoff.next_s()
    backoff.reset()
    assert backoff.failures == 0
    assert backoff.next_s() <= Settings().outage_backoff_s


def test_a_cap_below_the_first_wait_is_refused_with_the_settings_named() -> None:
    with pytest.raises(ValueError, match="IMGPIPE_OUTAGE_BACKOFF_MAX_S"):
        outage_retry_policy(Settings(outage_backoff_s=5.0, outage_backoff_max_s=1.0))
