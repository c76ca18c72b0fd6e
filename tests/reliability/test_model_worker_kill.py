"""The model worker killed (SIGKILL) in the middle of a micro-batch: every job still ends
``succeeded``, with exactly one result and one set of detections per stage run."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator

import pytest
from sqlalchemy import select

from db.engine import session_scope
from db.models import Detection, StageRun
from imgpipe.broker import EmbeddedRedis
from imgpipe.contracts import JobStatus, StageStatus
from imgpipe.face.stack import Stack
from imgpipe.settings import Settings
from orchestrator.context import OrchestratorContext
from orchestrator.submit import SubmitRequest, submit_many
from tests.reliability.conftest import drill_settings
from tests.reliability.test_crashes import failures, photo_jpeg
from tests.support.jobs import wait_jobs

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300), pytest.mark.one_backend("sqlite")]

MODEL_KINDS = ("detect", "moderate")
JOBS = 40


@pytest.fixture
def model_settings(own_broker: EmbeddedRedis, database_url: str) -> Iterator[Settings]:
    with drill_settings(
        own_broker,
        database_url,
        "ipmk-",
        # short limits so that the reaper's deadline (hard limit + grace) comes soon
        stage_time_limits_s={"quality": 5, "detect": 8, "moderate": 8},
        model_batch_size=8,
        model_batch_wait_ms=20,
    ) as settings:
        yield settings


def _running_model_rows(database_url: str) -> list[int]:
    with session_scope(database_url) as session:
        return list(
            session.execute(
                select(StageRun.id).where(
                    StageRun.status == StageStatus.RUNNING, StageRun.kind.in_(MODEL_KINDS)
                )
            ).scalars()
        )


def _kill_mid_batch(stack: Stack, db_url: str) -> list[int]:
    """SIGKILL the model worker while it holds model stages; the rows it interrupted."""
    deadline = time.monotonic() + 120
    seen: list[int] = []
    while len(seen) < 2 and time.monotonic() < deadline:
        seen = _running_model_rows(db_url)
        time.sleep(0.005)
    assert len(seen) >= 2, "no micro-batch of model stages was seen running"
    stack.kill("gpu")  # SIGKILL; the stack's supervisor starts a new model worker
    with session_scope(db_url) as session:
        return list(
            session.execute(
                select(StageRun.id).where(
                    StageRun.id.in_(seen), StageRun.status == StageStatus.RUNNING
                )
            ).scalars()
        )


def test_model_worker_killed_mid_batch_loses_and_doubles_nothing(
    model_settings: Settings,
) -> None:
    db_url = model_settings.effective_database_url
    with Stack(model_settings, workers=("orchestrator", "cpu", "gpu"), stop_timeout_s=10) as stack:
        stack.wait_ready(120)
        ctx = OrchestratorContext(model_settings)
        results = submit_many(
            ctx,
            [SubmitRequest(data=photo_jpeg(700 + i), pipeline="moderation") for i in range(JOBS)],
        )
        job_ids = [r.job_id for r in results if not isinstance(r, Exception)]
        assert len(job_ids) == JOBS, results
        interrupted: list[int] = []
        for _ in range(3):  # a batch may finish between being seen running and the kill
            interrupted = _kill_mid_batch(stack, db_url)
            if interrupted:
                break
        assert interrupted, "the model worker was never killed with a batch in hand"
        statuses = wait_jobs(db_url, job_ids, 200)
    assert set(statuses.values()) == {JobStatus.SUCCEEDED}, failures(model_settings, statuses)
    with session_scope(db_url) as session:
        rows = list(session.execute(select(StageRun).where(StageRun.job_id.in_(job_ids))).scalars())
        assert Counter(r.job_id for r in rows) == {j: 3 for j in job_ids}
        assert {r.status for r in rows} == {StageStatus.SUCCEEDED}
        stored = Counter(
            session.execute(
                select(Detection.stage_run_id).where(Detection.job_id.in_(job_ids))
            ).scalars()
        )
        for row in rows:
            if row.kind == "detect":
                listed = len((row.output or {}).get("detections", []))
                assert stored.get(row.id, 0) == listed, f"detections doubled or lost: {row.id}"
            if row.id in interrupted:
                assert row.attempts >= 2, "an interrupted stage is run again by a new attempt"
