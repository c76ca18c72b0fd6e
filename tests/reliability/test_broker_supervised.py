"""The embedded redis-server is supervised like the workers: kill -9 it and the stack
starts it again on the same socket with the same configuration; the workers reconnect
and jobs submitted before and after the crash all finish."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import time
from collections.abc import Iterator

import pytest

from db.migrate import upgrade
from imgpipe.contracts import JobStatus
from imgpipe.face.stack import Stack
from imgpipe.settings import Settings
from orchestrator.context import OrchestratorContext
from orchestrator.submit import SubmitRequest, submit
from tests.reliability.conftest import SHORT_LIMITS_S
from tests.reliability.test_crashes import failures, photo_jpeg
from tests.support.jobs import wait_jobs
from tests.support.services import own_database, short_tmp_dir
from tests.support.upstack import cmdline

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400), pytest.mark.one_backend("sqlite")]


@pytest.fixture
def embedded_settings(database_url: str) -> Iterator[Settings]:
    """No broker URL: the stack starts (and supervises) its own redis-server."""
    data_dir = short_tmp_dir("ipbk-")
    with own_database(database_url) as url:
        upgrade(url)
        yield Settings(
            data_dir=data_dir,
            database_url=url,
            stage_time_limits_s=SHORT_LIMITS_S,
            dispatch_grace_s=1,
            dispatch_timeout_s=3,
            reaper_interval_s=0.5,
            retry_backoff_s=0.2,
        )
    shutil.rmtree(data_dir, ignore_errors=True)


def wait_broker_replaced(stack: Stack, old_pid: int, timeout_s: float = 60) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        broker = stack.broker
        assert broker is not None
        process = broker.process
        if process is not None and process.pid != old_pid and broker.is_running():
            return process.pid
        time.sleep(0.05)
    raise AssertionError(f"the embedded redis-server was not restarted within {timeout_s} s")


def test_a_killed_embedded_broker_is_restarted_and_no_job_is_lost(
    embedded_settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="imgpipe.face.stack")
    settings = embedded_settings
    ctx = OrchestratorContext(settings)
    with Stack(settings, workers=("orchestrator", "cpu"), stop_timeout_s=30) as stack:
        stack.wait_ready(90)
        assert stack.broker is not None and stack.broker.process is not None
        old_pid = stack.broker.process.pid
        old_command = cmdline(old_pid)
        before = [
            submit(ctx, SubmitRequest(data=photo_jpeg(1100 + i), pipeline="basic")).job_id
            for i in range(6)
        ]
        os.kill(old_pid, signal.SIGKILL)
        new_pid = wait_broker_replaced(stack, old_pid)
        assert cmdline(new_pid) == old_command, "same socket, same configuration"
        after = [
            submit(ctx, SubmitRequest(data=photo_jpeg(1200 + i), pipeline="basic")).job_id
            for i in range(6)
        ]
        statuses = wait_jobs(settings.effective_database_url, before + after, 180)
        assert set(statuses.values()) == {JobStatus.SUCCEEDED}, failures(settings, statuses)
        assert stack.check_alive() == [], "every worker runs (reconnected or restarted)"
    restarts = [r.getMessage() for r in caplog.records if "redis-server" in r.getMessage()]
    assert any("restarting it on" in m for m in restarts), restarts
