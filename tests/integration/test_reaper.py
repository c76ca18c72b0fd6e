"""The reaper's decisions, on a real database and a real Redis (no workers involved)."""

from __future__ import annotations

from datetime import timedelta

from db.engine import session_scope
from db.migrate import upgrade
from db.models import Job, StageRun, utcnow
from imgpipe.broker import EmbeddedRedis
from imgpipe.contracts import JobStatus, StageStatus
from orchestrator.context import OrchestratorContext
from orchestrator.pipelines import load_pipeline
from orchestrator.reaper import reap
from tests.integration.conftest import make_settings
from tests.support.services import short_tmp_dir

QUEUE = "imgpipe.reaper-test"  # no worker consumes it


def overdue_job(ctx: OrchestratorContext, status: StageStatus, **row: object) -> int:
    spec = load_pipeline("basic").to_json()
    past = utcnow() - timedelta(seconds=5)
    with session_scope(ctx.database_url) as session:
        job = Job(
            input_sha256="0" * 64, pipeline="basic", pipeline_hash="h", pipeline_spec=spec,
            status=JobStatus.RUNNING,
        )  # fmt: skip
        session.add(job)
        session.flush()
        stage = StageRun(
            job_id=job.id, stage="quality", kind="quality", task_name="imgpipe.stage.quality",
            queue=QUEUE, status=status, deadline_at=past, dispatched_at=past,
            time_limit_s=5, **row,
        )  # fmt: skip
        session.add(stage)
        session.add(
            StageRun(
                job_id=job.id,
                stage="enhance",
                kind="enhance",
                task_name="imgpipe.stage.enhance",
                queue=QUEUE,
                status=StageStatus.PENDING,
                needs=["quality"],
                position=1,
            )
        )
        session.flush()
        return stage.id


def reload(ctx: OrchestratorContext, stage_run_id: int) -> StageRun:
    with session_scope(ctx.database_url) as session:
        row = session.get(StageRun, stage_run_id)
        assert row is not None
        session.expunge(row)
        return row


def test_reaper_postpones_behind_a_backlog_redispatches_lost_messages_and_gives_up(
    redis_broker: EmbeddedRedis,
) -> None:
    database_url = f"sqlite:///{short_tmp_dir('iprp-') / 'reaper.db'}"
    upgrade(database_url)
    ctx = OrchestratorContext(make_settings(redis_broker, database_url, max_dispatches=2))
    client = redis_broker.client()
    client.delete(QUEUE)
    stage_id = overdue_job(ctx, StageStatus.DISPATCHED, dispatch_count=1)

    client.lpush(QUEUE, "someone else's message")
    assert reap(ctx).redispatched == 0
    postponed = reload(ctx, stage_id)
    assert postponed.dispatch_count == 1 and postponed.deadline_at is not None
    assert postponed.deadline_at > utcnow(), "a backlog moves the deadline, it does not kill"

    client.delete(QUEUE)
    with session_scope(ctx.database_url) as session:
        row = session.get(StageRun, stage_id)
        assert row is not None
        row.deadline_at = utcnow() - timedelta(seconds=1)
    assert reap(ctx).redispatched == 1
    assert reload(ctx, stage_id).dispatch_count == 2
    assert client.llen(QUEUE) == 1, "the re-dispatch is a real message on the stage's queue"

    client.delete(QUEUE)
    with session_scope(ctx.database_url) as session:
        row = session.get(StageRun, stage_id)
        assert row is not None
        row.deadline_at = utcnow() - timedelta(seconds=1)
    assert reap(ctx).dead == 1
    dead = reload(ctx, stage_id)
    assert dead.status == StageStatus.DEAD
    assert dead.error is not None and "no worker claimed it" in dead.error
    with session_scope(ctx.database_url) as session:
        job = session.get(Job, dead.job_id)
        assert job is not None
        assert job.status == JobStatus.FAILED
        assert job.error is not None and "no worker claimed it" in job.error


def test_reaper_reruns_a_stage_whose_worker_died_until_attempts_run_out(
    redis_broker: EmbeddedRedis,
) -> None:
    database_url = f"sqlite:///{short_tmp_dir('iprp-') / 'reaper.db'}"
    upgrade(database_url)
    ctx = OrchestratorContext(make_settings(redis_broker, database_url, max_attempts=2))
    redis_broker.client().delete(QUEUE)
    first = overdue_job(ctx, StageStatus.RUNNING, attempts=1, max_attempts=2)
    assert reap(ctx).redispatched == 1
    assert reload(ctx, first).status == StageStatus.DISPATCHED
    last = overdue_job(ctx, StageStatus.RUNNING, attempts=2, max_attempts=2)
    assert reap(ctx).dead >= 1
    assert reload(ctx, last).status == StageStatus.DEAD
    assert "never finished" in (reload(ctx, last).error or "")


def test_reaper_redispatches_past_the_postponement_cap_despite_a_backlog(
    redis_broker: EmbeddedRedis,
) -> None:
    """A message lost behind an endless backfill is re-sent once the row has been postponed
    for ``reaper_postpone_max_s`` since its dispatch, backlog or not."""
    database_url = f"sqlite:///{short_tmp_dir('iprp-') / 'reaper.db'}"
    upgrade(database_url)
    ctx = OrchestratorContext(make_settings(redis_broker, database_url, reaper_postpone_max_s=60))
    client = redis_broker.client()
    client.delete(QUEUE)
    client.lpush(QUEUE, "a backfill's message")
    stage_id = overdue_job(ctx, StageStatus.DISPATCHED, dispatch_count=1)

    report = reap(ctx)
    assert (report.postponed, report.redispatched_past_cap) == (1, 0)
    row = reload(ctx, stage_id)
    assert row.dispatched_at is not None and row.deadline_at is not None
    assert row.deadline_at <= row.dispatched_at + timedelta(seconds=60), "checked at the cap"

    with session_scope(ctx.database_url) as session:
        stage = session.get(StageRun, stage_id)
        assert stage is not None
        stage.dispatched_at = utcnow() - timedelta(seconds=61)
        stage.deadline_at = utcnow() - timedelta(seconds=1)
    report = reap(ctx)
    assert (report.postponed, report.redispatched_past_cap) == (0, 1)
    assert reload(ctx, stage_id).dispatch_count == 2
    assert client.llen(QUEUE) == 2, "re-sent behind the backlog"


def test_one_failing_job_does_not_end_the_reaper_pass(redis_broker: EmbeddedRedis) -> None:
    """A job whose advance raises (its stage names a need that does not exist) is logged
    and counted; the healthy job next to it is still advanced in the same pass."""
    database_url = f"sqlite:///{short_tmp_dir('iprp-') / 'reaper.db'}"
    upgrade(database_url)
    ctx = OrchestratorContext(make_settings(redis_broker, database_url))
    redis_broker.client().delete(QUEUE)
    healthy = overdue_job(ctx, StageStatus.SUCCEEDED)
    broken = overdue_job(ctx, StageStatus.SUCCEEDED)
    with session_scope(ctx.database_url) as session:
        job_id = reload(ctx, broken).job_id
        for row in session.query(StageRun).filter(StageRun.job_id == job_id):
            if row.stage == "enhance":
                row.needs = ["no-such-stage"]

    report = reap(ctx)
    assert report.errors == 1, report
    assert report.advanced == 1, report
    with session_scope(ctx.database_url) as session:
        enhance = (
            session.query(StageRun)
            .filter(StageRun.job_id == reload(ctx, healthy).job_id, StageRun.stage == "enhance")
            .one()
        )
        assert enhance.status == StageStatus.DISPATCHED
