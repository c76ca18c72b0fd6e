"""Every submitter of a job gets an answer: the first and every duplicate (same
idempotency key) through the Python API, the submit stream and the Celery task get
``accepted`` (``duplicate: true`` for duplicates) and the job's ``completed`` event on their
own reply_to — also while the job is still running, and at once when it has finished.

The stack here is started in two steps on its own broker and database: first the
orchestrator alone, so the job cannot finish while the duplicates arrive, then the
stage worker.
"""

from __future__ import annotations

import base64
import shutil
import time
from collections.abc import Callable, Iterator

import pytest
import redis
from sqlalchemy import select

from db.engine import session_scope
from db.migrate import upgrade
from db.models import Job, JobReply
from imgpipe.broker import EmbeddedRedis
from imgpipe.contracts import CONTROL_QUEUE, SUBMIT_GROUP, SUBMIT_STREAM, SUBMIT_TASK, JobStatus
from imgpipe.face.stack import Stack
from imgpipe.settings import Settings
from orchestrator.context import OrchestratorContext
from orchestrator.ingest import SubmitConsumer
from orchestrator.submit import SubmitRequest, submit
from tests.clients.submit_client import SubmitClient
from tests.integration.conftest import make_settings
from tests.support.answers import wait_event, wait_outbox_empty
from tests.support.images import noise_png
from tests.support.jobs import wait_jobs
from tests.support.services import own_database

pytestmark = pytest.mark.timeout(180)

FIRST = "imgpipe:reply:first"
BY_API = "imgpipe:reply:api"
BY_STREAM = "imgpipe:reply:stream"
BY_CELERY = "imgpipe:reply:celery"
LATE = "imgpipe:reply:late"


@pytest.fixture
def phased_stack(
    own_broker: EmbeddedRedis, database_url: str
) -> Iterator[tuple[Settings, Callable[[tuple[str, ...]], Stack]]]:
    stacks: list[Stack] = []
    with own_database(database_url) as url:
        settings = make_settings(own_broker, url, ingest_block_ms=50)
        upgrade(url)

        def start(workers: tuple[str, ...]) -> Stack:
            stack = Stack(settings, workers=workers, stop_timeout_s=10)
            stack.start()
            stacks.append(stack)
            stack.wait_ready(60)
            return stack

        yield settings, start
        for stack in stacks:
            stack.stop()
    shutil.rmtree(settings.resolved_data_dir, ignore_errors=True)


def drain(consumer: SubmitConsumer, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        consumer.poll_once(block_ms=20)
        groups = consumer.client.xinfo_groups(SUBMIT_STREAM)
        group = next(g for g in groups if g["name"] == SUBMIT_GROUP.encode())
        if not group["pending"] and not group.get("lag"):
            return
    raise AssertionError("the submit stream was not drained")


def test_duplicates_of_a_running_job_get_accepted_and_completed_on_their_own_reply_to(
    phased_stack: tuple[Settings, Callable[[tuple[str, ...]], Stack]],
) -> None:
    settings, start = phased_stack
    start(("orchestrator",))  # no stage worker: the job cannot finish yet
    ctx = OrchestratorContext(settings)
    client = SubmitClient(redis.Redis.from_url(settings.effective_redis_url))
    data, key = noise_png(901, side_px=64), "dup-running"

    def request(reply_to: str) -> SubmitRequest:
        return SubmitRequest(data=data, pipeline="basic", idempotency_key=key, reply_to=reply_to)

    first = submit(ctx, request(FIRST))
    again = submit(ctx, request(BY_API))
    assert (again.job_id, again.created) == (first.job_id, False)
    client.submit(image=data, pipeline="basic", idempotency_key=key, reply_to=BY_STREAM)
    drain(SubmitConsumer(ctx, "dup-consumer"))
    ctx.celery.send_task(
        SUBMIT_TASK,
        kwargs={
            "image_b64": base64.b64encode(data).decode(),
            "pipeline": "basic",
            "idempotency_key": key,
            "reply_to": BY_CELERY,
        },
        queue=CONTROL_QUEUE,
    )
    accepted = {s: wait_event(client, s, "accepted", key, 30) for s in (FIRST, BY_API, BY_STREAM)}
    accepted[BY_CELERY] = wait_event(client, BY_CELERY, "accepted", key, 60)
    assert {e["job_id"] for e in accepted.values()} == {first.job_id}
    assert not accepted[FIRST].get("duplicate")
    assert all(accepted[s]["duplicate"] is True for s in (BY_API, BY_STREAM, BY_CELERY))
    assert len({e["event_id"] for e in accepted.values()}) == 4, "one answer per submission"
    with session_scope(settings.effective_database_url) as session:
        job = session.get(Job, first.job_id)
        assert job is not None and not JobStatus(job.status).terminal, "still running"
        subscribed = session.execute(
            select(JobReply.reply_to).where(JobReply.job_id == first.job_id)
        ).scalars()
        assert set(subscribed) == {BY_API, BY_STREAM, BY_CELERY}

    start(("cpu",))
    wait_jobs(settings.effective_database_url, [first.job_id], 90)
    for stream in (FIRST, BY_API, BY_STREAM, BY_CELERY):
        completed = wait_event(client, stream, "completed", key, 30)
        assert completed["job_id"] == first.job_id and completed["status"] == "succeeded"
        assert not completed.get("replay")
    ids = {wait_event(client, s, "completed", key, 1)["event_id"] for s in (FIRST, BY_STREAM)}
    assert len(ids) == 1, "one completed event, fanned out to every submitter"

    # A duplicate of a finished job is answered from SQL within its own submit call.
    late = submit(ctx, request(LATE))
    assert (late.job_id, late.created) == (first.job_id, False)
    events = [e for _id, e in client.read(LATE)]
    assert [e["event"] for e in events] == ["accepted", "completed"], events
    assert events[0]["duplicate"] is True and events[1]["replay"] is True
    assert events[1]["job_id"] == first.job_id and events[1]["status"] == "succeeded"
    wait_outbox_empty(settings.effective_database_url, 10)
