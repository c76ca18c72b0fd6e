"""A stop signal becomes StopRequested once; inside signals_deferred it waits."""

from __future__ import annotations

import os
import signal

import pytest

from imgpipe.face.stack import STOP_GRACE_S, STOP_ORDER, _stop_step, warm_stop_timeout_s
from imgpipe.face.stopsignals import StopRequested, signals_deferred, stop_on_signals
from imgpipe.settings import Settings


def test_sigterm_raises_stop_requested_once_and_a_second_is_ignored() -> None:
    with stop_on_signals():
        with pytest.raises(StopRequested) as raised:
            os.kill(os.getpid(), signal.SIGTERM)
        assert raised.value.exit_code == 143
        os.kill(os.getpid(), signal.SIGINT)  # already stopping: logged, not raised
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_a_signal_inside_signals_deferred_is_raised_when_the_block_ends() -> None:
    reached_end_of_block = False
    with stop_on_signals(), pytest.raises(StopRequested) as raised, signals_deferred():
        os.kill(os.getpid(), signal.SIGINT)
        reached_end_of_block = True
    assert reached_end_of_block
    assert raised.value.exit_code == 130


def test_stop_order_and_timeout() -> None:
    assert [_stop_step(n) for n in ("ingest", "cpu", "gpu-cuda0", "orchestrator", "flower")] == [
        0, 1, 1, 2, 3,
    ]  # fmt: skip
    assert STOP_ORDER[-1] == "flower"  # the broker is stopped after every child
    settings = Settings(stage_time_limits_s={"quality": 10, "detect": 300})
    assert warm_stop_timeout_s(settings) == 300 + STOP_GRACE_S


def test_stop_grace_covers_the_consumers_watchdog() -> None:
    from workers.batching import WATCHDOG_GRACE_S

    assert STOP_GRACE_S > WATCHDOG_GRACE_S
