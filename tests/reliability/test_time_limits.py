"""Stage time limits in a batching consumer: the soft limit stops Python-level work inside the
stage, the hard limit ends a consumer stuck in native code; either way the job ends ``failed``
with a reason after its attempts, the worker keeps serving, and other jobs are unharmed."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from db.engine import session_scope
from db.models import Job, StageRun
from imgpipe.broker import EmbeddedRedis
from imgpipe.contracts import JobStatus, StageStatus
from imgpipe.face.stack import Stack
from imgpipe.settings import Settings
from orchestrator.context import OrchestratorContext
from orchestrator.submit import SubmitRequest, submit
from tests.reliability.conftest import drill_settings
from tests.reliability.test_crashes import photo_jpeg
from tests.support.jobs import wait_jobs

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240), pytest.mark.one_backend("sqlite")]

NOOP_LIMIT_S = 1
PIPELINES = {
    # Python-level work past the limit: the soft limit interrupts it.
    "slow": {"sleep_ms": 20_000},
    # A call stuck in native code (SIGALRM blocked): only the hard limit ends it.
    "hung": {"hang_ms": 20_000},
}


def _pipeline_toml(name: str, params: dict[str, int]) -> str:
    lines = [f'name = "{name}"', "", "[stages.work]", 'kind = "noop"', "", "[stages.work.params]"]
    lines += [f"{key} = {value}" for key, value in params.items()]
    return "\n".join([*lines, "", "[policy]", 'vocabulary = "qc"', ""])


@pytest.fixture
def limits_settings(
    own_broker: EmbeddedRedis, database_url: str, tmp_path: Path
) -> Iterator[Settings]:
    pipelines_dir = tmp_path / "pipelines"
    pipelines_dir.mkdir()
    for name, params in PIPELINES.items():
        (pipelines_dir / f"{name}.toml").write_text(_pipeline_toml(name, params))
    with drill_settings(
        own_broker,
        database_url,
        "iptl-",
        pipelines_dir=pipelines_dir,
        stage_time_limits_s={"noop": NOOP_LIMIT_S},
        max_attempts=2,
    ) as settings:
        yield settings


def _stage(settings: Settings, job_id: str) -> StageRun:
    with session_scope(settings.effective_database_url) as session:
        row = session.execute(select(StageRun).where(StageRun.job_id == job_id)).scalar_one()
        session.expunge(row)
        return row


def _consumer_restarts(log_dir: Path) -> int:
    """How many times the pool replaced a consumer process (workers/pool.py logs it)."""
    text = "".join(p.read_text(errors="replace") for p in log_dir.glob("cpu*.log"))
    return text.count("ran past its hard time limit")


@pytest.mark.parametrize(
    ("pipeline", "expect_watchdog"), [("slow", False), ("hung", True)], ids=["soft", "hard"]
)
def test_a_stage_past_its_time_limit_fails_its_job_and_spares_the_others(
    limits_settings: Settings, pipeline: str, expect_watchdog: bool
) -> None:
    with Stack(limits_settings, workers=("orchestrator", "cpu"), stop_timeout_s=10) as stack:
        stack.wait_ready(60)
        ctx = OrchestratorContext(limits_settings)
        stuck = submit(ctx, SubmitRequest(data=photo_jpeg(900), pipeline=pipeline)).job_id
        healthy = [
            submit(ctx, SubmitRequest(data=photo_jpeg(910 + i), pipeline="noop")).job_id
            for i in range(10)
        ]
        statuses = wait_jobs(limits_settings.effective_database_url, [stuck, *healthy], 150)
        log_dir = stack.log_dir
        restarts = _consumer_restarts(log_dir)

    assert {statuses[j] for j in healthy} == {JobStatus.SUCCEEDED}, statuses
    assert statuses[stuck] == JobStatus.FAILED
    row = _stage(limits_settings, stuck)
    assert row.status == StageStatus.DEAD
    assert row.attempts == limits_settings.max_attempts
    with session_scope(limits_settings.effective_database_url) as session:
        job = session.get(Job, stuck)
        assert job is not None and job.error
    if expect_watchdog:
        # the soft limit could not interrupt it: every attempt ended by the watchdog
        assert restarts >= limits_settings.max_attempts, restarts
        assert "never finished" in (row.error or ""), row.error
    else:
        assert restarts == 0, "the soft limit must stop the stage without ending the process"
        assert f"time limit of {NOOP_LIMIT_S} s" in (row.error or ""), row.error
        assert all("time limit" in h["error"] for h in row.error_history), row.error_history
