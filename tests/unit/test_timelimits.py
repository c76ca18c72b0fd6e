"""Soft time limits inside a consumer (workers/timelimits.py): they interrupt stage work,
and pause while a model loads."""

from __future__ import annotations

import time

import pytest

from workers.timelimits import (
    ComputeClock,
    StageTimeLimitExceeded,
    hard_limit_s,
    soft_time_limit,
    time_limits_are_paused,
    time_limits_paused,
)


def test_the_soft_limit_interrupts_python_level_work_with_a_retryable_error() -> None:
    with pytest.raises(StageTimeLimitExceeded, match=r"time limit of 0\.3 s"), soft_time_limit(0.3):
        time.sleep(5)


def test_a_model_load_is_not_counted_and_the_limit_resumes_after_it() -> None:
    clock = ComputeClock()
    with pytest.raises(StageTimeLimitExceeded), clock.running(0.5), soft_time_limit(0.5):
        with time_limits_paused():
            assert time_limits_are_paused()
            time.sleep(1.0)  # twice the limit: a load, not stage work
            assert clock.overdue_s(time.monotonic() + 60) is None
        assert not time_limits_are_paused()
        time.sleep(0.05)  # within what was left
        time.sleep(5)  # stage work past the limit


def test_the_hard_limit_follows_the_soft_one_with_a_bounded_grace() -> None:
    assert hard_limit_s(1) == 2
    assert hard_limit_s(300) == 310
