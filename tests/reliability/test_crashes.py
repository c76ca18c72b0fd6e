"""Killed workers, refused messages and a crashed broker delay jobs but never lose them."""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import func, select

from db.engine import session_scope
from db.models import Image as ImageRow
from db.models import Job, StageRun
from imgpipe.broker import EmbeddedRedis
from imgpipe.contracts import JobStatus, StageStatus
from imgpipe.face.stack import Stack
from imgpipe.settings import Settings
from orchestrator.context import OrchestratorContext
from orchestrator.submit import SubmitRequest, submit
from tests.support.jobs import wait_jobs

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


def photo_jpeg(seed: int, size: tuple[int, int] = (1280, 720)) -> bytes:
    """A textured test image, different per seed (so no cache hits)."""
    rng = np.random.default_rng(seed)
    w, h = size
    base = rng.integers(0, 255, (h // 16, w // 16, 3), dtype=np.uint8)
    pixels = np.asarray(Image.fromarray(base).resize((w, h), Image.Resampling.BICUBIC))
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def failures(settings: Settings, statuses: dict[str, str]) -> list[str]:
    """The errors of the jobs that did not succeed (for assertion messages)."""
    bad = [job_id for job_id, status in statuses.items() if status != JobStatus.SUCCEEDED]
    with session_scope(settings.effective_database_url) as session:
        return [
            f"{r.stage}: {r.status} after {r.attempts} attempt(s): {r.error_history}"
            for r in session.execute(select(StageRun).where(StageRun.job_id.in_(bad))).scalars()
        ]


class PickleSendingContext(OrchestratorContext):
    """A misbehaving producer: the same task messages, serialised with pickle.

    imgpipe itself never sends pickle; this test proves a worker refuses such a message
    (JSON-only ``accept_content``) and that SQL and the reaper recover the stage."""

    def send(self, task_name: str, args: list[Any], queue: str, **options: Any) -> None:
        self.celery.send_task(task_name, args=args, queue=queue, serializer="pickle", **options)


def test_pickle_message_is_refused_and_the_reaper_redispatches_from_sql(
    make_stack: Callable[..., Stack], short_deadline_settings: Settings
) -> None:
    make_stack()
    evil = PickleSendingContext(short_deadline_settings)
    result = submit(evil, SubmitRequest(data=photo_jpeg(1), pipeline="basic"))
    statuses = wait_jobs(short_deadline_settings.effective_database_url, [result.job_id], 60)
    assert statuses[result.job_id] == JobStatus.SUCCEEDED
    with session_scope(short_deadline_settings.effective_database_url) as session:
        quality = session.execute(
            select(StageRun).where(StageRun.job_id == result.job_id, StageRun.stage == "quality")
        ).scalar_one()
        assert quality.attempts == 1, "the pickle message must never have run the stage"
        assert quality.dispatch_count == 2, "the reaper re-dispatched it once"


def test_killed_worker_mid_stage_leaves_one_result_per_stage(
    make_stack: Callable[..., Stack], short_deadline_settings: Settings
) -> None:
    stack = make_stack()
    ctx = OrchestratorContext(short_deadline_settings)
    job_ids = [
        submit(ctx, SubmitRequest(data=photo_jpeg(100 + i, (1920, 1080)), pipeline="basic")).job_id
        for i in range(12)
    ]
    db_url = short_deadline_settings.effective_database_url
    deadline = time.monotonic() + 30
    running: list[int] = []
    while not running and time.monotonic() < deadline:
        with session_scope(db_url) as session:
            running = list(
                session.execute(
                    select(StageRun.id).where(StageRun.status == StageStatus.RUNNING)
                ).scalars()
            )
        time.sleep(0.005)
    assert running, "no stage was seen running"
    stack.kill("cpu")  # the stack's supervisor restarts it
    with session_scope(db_url) as session:
        interrupted = list(
            session.execute(
                select(StageRun.id).where(StageRun.status == StageStatus.RUNNING)
            ).scalars()
        )
    statuses = wait_jobs(short_deadline_settings.effective_database_url, job_ids, 120)
    assert set(statuses.values()) == {JobStatus.SUCCEEDED}, failures(
        short_deadline_settings, statuses
    )
    with session_scope(db_url) as session:
        per_job = session.execute(
            select(StageRun.job_id, func.count())
            .where(StageRun.job_id.in_(job_ids))
            .group_by(StageRun.job_id)
        ).all()
        assert {count for _, count in per_job} == {2}
        rerun = session.execute(select(StageRun).where(StageRun.id.in_(interrupted))).scalars()
        for row in rerun:
            assert row.status == StageStatus.SUCCEEDED
            assert row.attempts >= 2, "an interrupted stage is run again by a new attempt"


def test_broker_crash_and_restart_delays_but_loses_no_job(
    make_stack: Callable[..., Stack],
    short_deadline_settings: Settings,
    own_broker: EmbeddedRedis,
) -> None:
    make_stack()
    ctx = OrchestratorContext(short_deadline_settings)
    job_ids = [
        submit(ctx, SubmitRequest(data=photo_jpeg(500 + i), pipeline="basic")).job_id
        for i in range(20)
    ]
    time.sleep(0.3)
    own_broker.kill()
    time.sleep(1.0)
    own_broker.start()
    statuses = wait_jobs(short_deadline_settings.effective_database_url, job_ids, 150)
    assert set(statuses.values()) == {JobStatus.SUCCEEDED}, failures(
        short_deadline_settings, statuses
    )


def test_transient_errors_retry_with_backoff_then_dead_letter_with_history(
    make_stack: Callable[..., Stack], short_deadline_settings: Settings
) -> None:
    """A working copy missing from the blob store is transient (a worker may see a blob
    store that is not shared): retried up to max_attempts, then dead, every error kept."""
    make_stack(("orchestrator",))
    ctx = OrchestratorContext(short_deadline_settings)
    result = submit(ctx, SubmitRequest(data=photo_jpeg(42), pipeline="basic"))
    with session_scope(short_deadline_settings.effective_database_url) as session:
        job = session.get(Job, result.job_id)
        assert job is not None and job.image_sha256 is not None
        image = session.get(ImageRow, job.image_sha256)
        assert image is not None and image.working_blob_key is not None
        working_key = image.working_blob_key
    blob_path = short_deadline_settings.resolved_data_dir / "blobs" / working_key
    blob_path.unlink()
    make_stack(("cpu",))
    statuses = wait_jobs(short_deadline_settings.effective_database_url, [result.job_id], 90)
    assert statuses[result.job_id] == JobStatus.FAILED
    with session_scope(short_deadline_settings.effective_database_url) as session:
        quality = session.execute(
            select(StageRun).where(StageRun.job_id == result.job_id, StageRun.stage == "quality")
        ).scalar_one()
        assert quality.status == StageStatus.DEAD
        assert quality.attempts == short_deadline_settings.max_attempts
        assert len(quality.error_history) == short_deadline_settings.max_attempts
        assert all("is missing" in e["error"] for e in quality.error_history)
        enhance = session.execute(
            select(StageRun).where(StageRun.job_id == result.job_id, StageRun.stage == "enhance")
        ).scalar_one()
        assert enhance.skip_reason == "upstream_failed:quality"
