"""Exactly one result per stage run, on SQLite and PostgreSQL: duplicate deliveries racing
for the same row run it once, and a stale attempt cannot overwrite the current one.

The executor and the persist run in this process against a real database and a real
broker (no worker processes), so the interleavings are chosen, not hoped for."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from db.engine import session_scope
from db.migrate import upgrade
from db.models import StageRun, utcnow
from imgpipe.broker import EmbeddedRedis
from imgpipe.contracts import StageStatus
from imgpipe.settings import Settings
from orchestrator.context import OrchestratorContext
from orchestrator.reaper import reap
from orchestrator.submit import SubmitRequest, submit
from tests.integration.conftest import make_settings
from tests.support.services import own_database
from workers.claims import Claim, ClaimRequest, claim_rows
from workers.execute import StageExecutor
from workers.persist import Finished, persist_finished
from workers.stagecontract import StageOutput

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def settings(own_broker: EmbeddedRedis, database_url: str) -> Iterator[Settings]:
    with own_database(database_url) as url:
        upgrade(url)
        yield make_settings(own_broker, url)


def quality_row(settings: Settings, samples_dir: Path) -> int:
    ctx = OrchestratorContext(settings)
    data = (samples_dir / "coffee.jpg").read_bytes()
    job_id = submit(ctx, SubmitRequest(data=data, pipeline="basic", force=True)).job_id
    with session_scope(settings.effective_database_url) as session:
        return session.execute(
            select(StageRun.id).where(StageRun.job_id == job_id, StageRun.stage == "quality")
        ).scalar_one()


def row_of(settings: Settings, stage_run_id: int) -> StageRun:
    with session_scope(settings.effective_database_url) as session:
        row = session.get(StageRun, stage_run_id)
        assert row is not None
        return row


def test_racing_duplicate_deliveries_run_the_stage_once(
    settings: Settings, samples_dir: Path
) -> None:
    stage_run_id = quality_row(settings, samples_dir)
    executors = [StageExecutor(settings, "cpu") for _ in range(4)]
    start = threading.Barrier(len(executors))
    statuses: dict[str, str] = {}

    def deliver(index: int) -> None:
        start.wait()
        [outcome] = executors[index].run_batch([ClaimRequest(stage_run_id, f"delivery-{index}")])
        statuses[f"delivery-{index}"] = outcome.status

    threads = [threading.Thread(target=deliver, args=(i,)) for i in range(len(executors))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    winners = [task for task, status in statuses.items() if status == "stage_succeeded"]
    assert len(statuses) == len(executors)
    assert len(winners) == 1, statuses
    assert set(statuses.values()) <= {"stage_succeeded", "running_elsewhere", "duplicate"}
    row = row_of(settings, stage_run_id)
    assert row.status == StageStatus.SUCCEEDED
    assert row.attempts == 1, "one run, one attempt"
    assert row.celery_task_id == winners[0], "the provenance is the winner's"


def test_a_stale_attempt_cannot_overwrite_the_attempt_that_replaced_it(
    settings: Settings, samples_dir: Path
) -> None:
    url = settings.effective_database_url
    stage_run_id = quality_row(settings, samples_dir)
    slow = StageExecutor(settings, "cpu")
    slow.identity = replace(slow.identity, host="slow-host")
    with session_scope(url) as session:
        [claim] = claim_rows(session, [ClaimRequest(stage_run_id, "slow")], utcnow(), slow.identity)
    assert isinstance(claim, Claim) and claim.attempt == 1

    # the slow worker's deadline passes: the reaper gives the row to a new attempt
    with session_scope(url) as session:
        row = session.get(StageRun, stage_run_id)
        assert row is not None
        row.deadline_at = utcnow() - timedelta(seconds=1)
    report = reap(OrchestratorContext(settings))
    assert report.redispatched == 1
    fast = StageExecutor(settings, "cpu")
    fast.identity = replace(fast.identity, host="fast-host")
    [outcome] = fast.run_batch([ClaimRequest(stage_run_id, "fast")])
    assert outcome.status == "stage_succeeded"

    # now the slow one finishes and tries to write its (different) result
    stale = Finished(
        stage_run_id, claim.job_id, claim.stage, claim.attempt, None,
        StageOutput({"score": -1.0, "from": "the stale attempt"}),
    )  # fmt: skip
    with session_scope(url) as session:
        [stale_outcome], _after, _local = persist_finished(session, [stale], utcnow(), settings)
    assert stale_outcome.status in ("duplicate", "superseded")
    row = row_of(settings, stage_run_id)
    assert row.status == StageStatus.SUCCEEDED and row.attempts == 2
    assert row.worker_host == "fast-host" and row.celery_task_id == "fast"
    assert (row.output or {}).get("from") is None, "the stale result never lands"


def test_a_stale_attempt_is_discarded_while_the_new_one_still_runs(
    settings: Settings, samples_dir: Path
) -> None:
    url = settings.effective_database_url
    stage_run_id = quality_row(settings, samples_dir)
    me = StageExecutor(settings, "cpu").identity
    with session_scope(url) as session:
        [first] = claim_rows(session, [ClaimRequest(stage_run_id, "first")], utcnow(), me)
        row = session.get(StageRun, stage_run_id)
        assert row is not None
        row.deadline_at = utcnow() - timedelta(seconds=1)
    assert isinstance(first, Claim)
    with session_scope(url) as session:  # a second delivery after the deadline: attempt 2
        [second] = claim_rows(session, [ClaimRequest(stage_run_id, "second")], utcnow(), me)
    assert isinstance(second, Claim) and second.attempt == 2
    stale = Finished(
        stage_run_id, first.job_id, first.stage, first.attempt, None, StageOutput({"x": 1})
    )
    with session_scope(url) as session:
        [outcome], _after, _local = persist_finished(session, [stale], utcnow(), settings)
    assert outcome.status == "superseded"
    row = row_of(settings, stage_run_id)
    assert row.status == StageStatus.RUNNING and row.attempts == 2, "the live run is untouched"
    assert row.celery_task_id == "second"
