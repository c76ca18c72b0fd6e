"""Interactive work goes before bulk work on every queue (DESIGN "Queues and workers").

Stage queues have ``.bulk`` siblings (contracts.queue_for); workers consume ``q,q.bulk``
with the ``priority`` queue order, and a bulk job's ``advance`` goes to
``imgpipe.control.bulk``. So one interactive job submitted behind a backlog of bulk jobs
overtakes nearly all of them.

On a 2-core machine this test process (submitting) and the workers share the CPU, and the
workers would finish a good part of the 500 bulk jobs while the rest are still being
queued. So the CPU worker stops consuming (Celery remote control ``cancel_consumer``)
while the backlog is queued and starts again (``add_consumer``, interactive queue first)
once the interactive job is queued behind it: the same state as a real backlog.
"""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import func, select

from db.engine import session_scope
from db.models import Job
from imgpipe.contracts import CPU_QUEUE, JobStatus, Priority, bulk_queue
from orchestrator.context import OrchestratorContext
from orchestrator.submit import SubmitRequest, submit
from tests.support.jobs import wait_jobs

pytestmark = [pytest.mark.slow, pytest.mark.timeout(280)]

BULK_JOBS = 500


def small_png(seed: int, side_px: int = 48) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (side_px, side_px, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@contextmanager
def cpu_worker_paused(ctx: OrchestratorContext) -> Iterator[None]:
    control = ctx.celery.control
    names = [name for reply in control.ping(timeout=2) for name in reply]
    cpu_workers = [n for n in names if n.startswith("cpu-")]
    assert cpu_workers, f"no CPU worker answered: {names}"
    queues = [CPU_QUEUE, bulk_queue(CPU_QUEUE)]
    for queue in queues:
        control.cancel_consumer(queue, destination=cpu_workers, reply=True, timeout=5)
    try:
        yield
    finally:
        for queue in queues:  # interactive first: the order the worker polls them in
            control.add_consumer(queue, destination=cpu_workers, reply=True, timeout=5)


def test_interactive_job_overtakes_500_queued_bulk_jobs(ctx: OrchestratorContext) -> None:
    images = [small_png(10_000 + i) for i in range(BULK_JOBS + 1)]
    started = time.monotonic()
    with cpu_worker_paused(ctx):
        bulk_ids = [
            submit(
                ctx, SubmitRequest(data=data, pipeline="basic", priority=Priority.BULK, force=True)
            ).job_id
            for data in images[:BULK_JOBS]
        ]
        queued_s = time.monotonic() - started
        interactive_id = submit(
            ctx, SubmitRequest(data=images[-1], pipeline="basic", force=True)
        ).job_id
    wait_jobs(ctx.database_url, [interactive_id], 60)
    interactive_s = time.monotonic() - started
    wait_jobs(ctx.database_url, bulk_ids, 240)
    with session_scope(ctx.database_url) as session:
        interactive = session.get(Job, interactive_id)
        assert interactive is not None and interactive.finished_at is not None
        assert interactive.status == JobStatus.SUCCEEDED
        earlier = session.execute(
            select(func.count())
            .select_from(Job)
            .where(Job.id.in_(bulk_ids), Job.finished_at < interactive.finished_at)
        ).scalar_one()
        bulk_ok = session.execute(
            select(func.count())
            .select_from(Job)
            .where(Job.id.in_(bulk_ids), Job.status == JobStatus.SUCCEEDED)
        ).scalar_one()
    print(
        f"queued {BULK_JOBS} bulk jobs in {queued_s:.1f} s; interactive done at "
        f"{interactive_s:.1f} s after {earlier} bulk jobs; all done at "
        f"{time.monotonic() - started:.1f} s"
    )
    assert bulk_ok == BULK_JOBS
    assert earlier <= 0.2 * BULK_JOBS, f"{earlier} bulk jobs finished before the interactive one"
