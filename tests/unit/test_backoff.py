"""Bounded backoff with jitter (imgpipe/backoff.py)."""

from __future__ import annotations

import random

import pytest

from imgpipe.backoff import Backoff, backoff_delay_s


def test_delays_double_then_stay_under_the_cap_with_jitter() -> None:
    rng = random.Random(1)
    for tries in range(40):
        capped = min(4.0, 0.5 * 2**tries)
        delays = {backoff_delay_s(tries, 0.5, 4.0, rng) for _ in range(50)}
        assert all(capped / 2 <= d <= capped for d in delays)
        assert len(delays) > 1, "jittered: processes that failed together spread out"


def test_backoff_resets_after_a_success() -> None:
    backoff = Backoff(0.5, 4.0, random.Random(2))
    waits = [backoff.next_s() for _ in range(6)]
    assert waits[0] <= 0.5 and max(waits) <= 4.0 and waits[-1] >= 2.0
    backoff.reset()
    assert backoff.next_s() <= 0.5


def test_a_cap_below_the_first_wait_is_refused_with_the_settings_named() -> None:
    with pytest.raises(ValueError, match="IMGPIPE_OUTAGE_BACKOFF_MAX_S"):
        Backoff(5.0, 1.0)
