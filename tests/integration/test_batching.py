"""The micro-batching model worker and the DAG step that runs where a stage finishes.

Each test runs its own stack on its own database, with no orchestrator process: jobs that
complete prove that no ``advance`` message on the control queue is needed. Stage messages
for the model queue are queued before the model worker starts, so it finds a backlog and
must batch it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from db.engine import session_scope
from db.migrate import upgrade
from db.models import Detection, StageRun
from imgpipe.broker import EmbeddedRedis
from imgpipe.contracts import CPU_QUEUE, JobStatus, Priority, StageStatus
from imgpipe.face.stack import Stack
from imgpipe.settings import Settings
from orchestrator.context import OrchestratorContext
from orchestrator.submit import SubmitRequest, submit
from tests.integration.conftest import make_settings
from tests.support.jobs import wait_jobs
from tests.support.services import own_database
from workers.claims import ClaimRequest
from workers.execute import StageExecutor

pytestmark = pytest.mark.timeout(300)

BATCH_SIZE = 4
JOBS = 7


@pytest.fixture
def cpu_only_stack(own_broker: EmbeddedRedis, database_url: str) -> Iterator[Stack]:
    """A stack with a CPU worker only: no orchestrator, no model worker yet; its own
    broker and database, so no other stack's workers take its messages."""
    with own_database(database_url) as url:
        upgrade(url)
        settings = make_settings(
            own_broker, url, model_batch_size=BATCH_SIZE, model_batch_wait_ms=50.0
        )
        stack = Stack(settings, workers=("cpu",), stop_timeout_s=15)
        with stack:
            stack.wait_ready(60)
            yield stack


def wait_model_stages_dispatched(settings: Settings, job_ids: list[str], count: int) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        with session_scope(settings.effective_database_url) as session:
            dispatched = session.execute(
                select(StageRun.id).where(
                    StageRun.job_id.in_(job_ids),
                    StageRun.kind.in_(["detect", "moderate"]),
                    StageRun.status == StageStatus.DISPATCHED,
                )
            ).all()
        if len(dispatched) >= count:
            return
        time.sleep(0.2)
    raise AssertionError(f"only {len(dispatched)} of {count} model stages were dispatched")


def test_queued_model_stages_run_in_batches_and_jobs_finish_without_an_orchestrator(
    cpu_only_stack: Stack, samples_dir: Path
) -> None:
    settings = cpu_only_stack.settings
    ctx = OrchestratorContext(settings)
    data = (samples_dir / "astronaut.jpg").read_bytes()
    bad = {"detect": {"score_threshold": "high"}}  # passes submit, fails in the stage
    job_ids = [
        submit(
            ctx,
            SubmitRequest(
                data=data, pipeline="moderation", force=True, overrides=bad if i == 3 else None
            ),
        ).job_id
        for i in range(JOBS)
    ]
    wait_model_stages_dispatched(settings, job_ids, 2 * JOBS)
    cpu_only_stack.add_gpu_worker("cpu")
    statuses = wait_jobs(settings.effective_database_url, job_ids, 240)

    bad_job = job_ids[3]
    assert statuses[bad_job] == JobStatus.FAILED
    assert all(statuses[j] == JobStatus.SUCCEEDED for j in job_ids if j != bad_job), statuses
    with session_scope(settings.effective_database_url) as session:
        rows = (
            session.execute(
                select(StageRun).where(StageRun.job_id.in_(job_ids), StageRun.kind == "detect")
            )
            .scalars()
            .all()
        )
        by_job = {r.job_id: r for r in rows}
        failed = by_job.pop(bad_job)
        assert failed.status == StageStatus.FAILED
        assert "score_threshold" in (failed.error or "")
        sizes = [r.batch_size or 0 for r in by_job.values()]
        assert max(sizes) > 1, f"the backlog was not batched: batch sizes {sizes}"
        assert max(sizes) <= BATCH_SIZE
        outputs = {str(r.output["detections"]) for r in by_job.values() if r.output}
        assert len(outputs) == 1, "the same image must give the same boxes in any batch"
        assert all(r.attempts == 1 and r.device == "cpu" for r in by_job.values())
        per_job = {
            job_id: session.execute(select(Detection.label).where(Detection.job_id == job_id)).all()
            for job_id in by_job
        }
        assert all(labels for labels in per_job.values()), "every job has its own detections"


def test_worker_continues_interactive_jobs_locally_and_sends_bulk_jobs_through_the_queue(
    cpu_only_stack: Stack, samples_dir: Path
) -> None:
    settings = cpu_only_stack.settings
    ctx = OrchestratorContext(settings)
    data = (samples_dir / "coffee.jpg").read_bytes()
    interactive = submit(ctx, SubmitRequest(data=data, pipeline="basic", force=True)).job_id
    bulk = submit(
        ctx, SubmitRequest(data=data, pipeline="basic", force=True, priority=Priority.BULK)
    ).job_id
    statuses = wait_jobs(settings.effective_database_url, [interactive, bulk], 60)
    assert set(statuses.values()) == {JobStatus.SUCCEEDED}
    with session_scope(settings.effective_database_url) as session:
        rows = {
            (r.job_id, r.stage): r
            for r in session.execute(
                select(StageRun).where(StageRun.job_id.in_([interactive, bulk]))
            ).scalars()
        }
    local = rows[(interactive, "enhance")]
    assert (local.celery_task_id or "").startswith("local-")
    assert local.worker_pid == rows[(interactive, "quality")].worker_pid
    assert local.attempts == 1 and local.dispatch_count == 1
    queued = rows[(bulk, "enhance")]
    assert not (queued.celery_task_id or "local-").startswith("local-")
    assert queued.queue.endswith(".bulk")


def test_a_stopping_worker_hands_locally_claimed_stages_back_to_their_queue(
    own_broker: EmbeddedRedis, database_url: str, samples_dir: Path
) -> None:
    """The executor in this process, a real broker and database, no worker processes."""
    with own_database(database_url) as url:
        upgrade(url)
        settings = make_settings(own_broker, url)
        ctx = OrchestratorContext(settings)
        data = (samples_dir / "coffee.jpg").read_bytes()
        job_id = submit(ctx, SubmitRequest(data=data, pipeline="basic", force=True)).job_id
        broker = own_broker.client()
        assert broker.llen(CPU_QUEUE) == 1  # quality's message; nobody consumes it here
        broker.delete(CPU_QUEUE)
        executor = StageExecutor(settings, "cpu")
        executor.continue_locally([CPU_QUEUE], limit=8)
        with session_scope(url) as session:
            quality = session.execute(
                select(StageRun).where(StageRun.job_id == job_id, StageRun.stage == "quality")
            ).scalar_one()
        [outcome] = executor.run_batch([ClaimRequest(quality.id, "t-1")])
        assert outcome.status == "stage_succeeded"
        assert [c.stage for c in executor.continuations] == ["enhance"]
        assert broker.llen(CPU_QUEUE) == 0, "a continued stage sends no message"

        executor.release_continuations()
        with session_scope(url) as session:
            enhance = session.execute(
                select(StageRun).where(StageRun.job_id == job_id, StageRun.stage == "enhance")
            ).scalar_one()
            assert enhance.status == StageStatus.DISPATCHED
            assert enhance.attempts == 0 and enhance.dispatch_count == 2
        assert broker.llen(CPU_QUEUE) == 1, "its message is on the queue for any worker"
        assert executor.continuations == []
