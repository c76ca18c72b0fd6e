"""A duplicate submission re-sends the stage messages its job's first submission lost.

The case: a submission commits its job, but its caller sees an error (the connection
died during COMMIT, or the broker refused the messages after it) and tries again. The
retry is a duplicate of the job; the job's stage rows are ``dispatched`` with no message
anywhere. Here the message is lost for real (the queue is deleted from the broker), then
the key is submitted again: nothing is re-sent while the row is freshly dispatched,
one message once it has waited ``RESEND_AFTER_S`` (and the row's ``dispatched_at`` moves
to the re-send, which is what limits a flood of duplicates), and a CPU worker started
afterwards finishes the job from the re-sent message, long before the reaper's 5-minute
dispatch deadline.
"""

from __future__ import annotations

import json
import shutil
from datetime import timedelta

import pytest
from sqlalchemy import select, update

from db.engine import session_scope
from db.migrate import upgrade
from db.models import StageRun, utcnow
from imgpipe.broker import EmbeddedRedis
from imgpipe.contracts import StageStatus
from imgpipe.face.stack import Stack
from imgpipe.settings import Settings
from orchestrator.context import OrchestratorContext
from orchestrator.resend import RESEND_AFTER_S
from orchestrator.submit import SubmitRequest, submit
from tests.integration.conftest import make_settings
from tests.support.images import noise_png
from tests.support.jobs import wait_jobs
from tests.support.services import own_database

pytestmark = pytest.mark.timeout(180)


def dispatched_row(database_url: str, job_id: str) -> StageRun:
    with session_scope(database_url) as session:
        rows = (
            session.execute(
                select(StageRun).where(
                    StageRun.job_id == job_id, StageRun.status == StageStatus.DISPATCHED
                )
            )
            .scalars()
            .all()
        )
        assert len(rows) == 1, [(r.stage, r.status) for r in rows]
        session.expunge_all()
        return rows[0]


def queued_stage_runs(broker: EmbeddedRedis, queue: str) -> list[str]:
    """The argsrepr of every Celery message waiting in ``queue`` (e.g. ``"[17]"``)."""
    raw = broker.client().lrange(queue, 0, -1)
    return [json.loads(message)["headers"]["argsrepr"] for message in raw]


def test_duplicate_resends_a_lost_stage_message(
    own_broker: EmbeddedRedis, database_url: str
) -> None:
    with own_database(database_url) as url:
        settings = make_settings(own_broker, url)
        upgrade(url)
        try:
            run(own_broker, url, settings)
        finally:
            shutil.rmtree(settings.resolved_data_dir, ignore_errors=True)


def run(broker: EmbeddedRedis, url: str, settings: Settings) -> None:
    ctx = OrchestratorContext(settings)
    request = SubmitRequest(noise_png(1, side_px=96), "basic", idempotency_key="lost-message")
    first = submit(ctx, request)
    row = dispatched_row(url, first.job_id)
    assert queued_stage_runs(broker, row.queue) == [f"[{row.id}]"]
    broker.client().delete(row.queue)  # the message is lost
    assert row.dispatched_at is not None

    with session_scope(url) as session:  # dispatched just now, whatever this machine's speed
        session.execute(
            update(StageRun).where(StageRun.id == row.id).values(dispatched_at=utcnow())
        )
    again = submit(ctx, request)
    assert (again.job_id, again.created) == (first.job_id, False)
    assert queued_stage_runs(broker, row.queue) == [], (
        "a row dispatched a moment ago is not re-sent: its message may still be on its way"
    )

    with session_scope(url) as session:  # as if the first try had been RESEND_AFTER_S ago
        session.execute(
            update(StageRun)
            .where(StageRun.id == row.id)
            .values(dispatched_at=row.dispatched_at - timedelta(seconds=RESEND_AFTER_S + 1))
        )
    submit(ctx, request)
    assert queued_stage_runs(broker, row.queue) == [f"[{row.id}]"]
    resent = dispatched_row(url, first.job_id)
    assert resent.dispatched_at is not None and resent.dispatched_at > row.dispatched_at
    assert (resent.dispatch_count, resent.deadline_at) == (row.dispatch_count, row.deadline_at)

    with Stack(settings, workers=("cpu",), stop_timeout_s=10) as stack:
        stack.wait_ready(90)
        statuses = wait_jobs(url, [first.job_id], timeout_s=90)
    assert statuses[first.job_id] == "succeeded"
