"""A poison image that kills its worker every time, sent as the Celery task
``imgpipe.submit``: it is not redelivered forever but ends as a ``rejected`` job with
reason ``crashed_worker`` and an event on its ``reply_to``; the stack keeps working.

No real image is known that crashes this Pillow, so the drill uses the test-only hook of
``imgpipe.decode`` (``TEST_IMGPIPE_CRASH_DECODE_MAGIC``, set here and inherited by the
stack's workers): decoding bytes that start with the magic value ends the process with
``os._exit``, as a segfault in a native decoder would.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable
from typing import Any

import pytest

from db.engine import session_scope
from db.models import Job
from imgpipe.contracts import SUBMIT_CRASHES_PREFIX, JobStatus
from imgpipe.decode import CRASH_DRILL_ENV
from imgpipe.face.stack import Stack
from imgpipe.settings import Settings
from orchestrator.context import OrchestratorContext
from tests.reliability.test_crashes import photo_jpeg
from tests.support.jobs import wait_jobs

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

MAGIC = "IMGPIPE-POISON-3b8e"


def _send(ctx: OrchestratorContext, data: bytes, **fields: Any) -> None:
    kwargs = {"image_b64": base64.b64encode(data).decode(), "pipeline": "basic", **fields}
    ctx.celery.send_task("imgpipe.submit", kwargs=kwargs, queue="imgpipe.control")


def _job_by_key(ctx: OrchestratorContext, key: str, timeout_s: float) -> Job:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with session_scope(ctx.database_url) as session:
            job = session.query(Job).filter(Job.idempotency_key == key).one_or_none()
            if job is not None:
                session.expunge(job)
                return job
        time.sleep(0.2)
    raise AssertionError(f"no job with idempotency key {key!r} after {timeout_s} s")


def _no_crash_counters(ctx: OrchestratorContext, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while ctx.events.client.keys(f"{SUBMIT_CRASHES_PREFIX}*"):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def _replies(ctx: OrchestratorContext, stream: str, count: int, timeout_s: float) -> list[dict]:
    deadline = time.monotonic() + timeout_s
    while True:
        entries = ctx.events.client.xrange(stream)
        if len(entries) >= count or time.monotonic() > deadline:
            return [{k.decode(): json.loads(v) for k, v in f.items()} for _, f in entries]
        time.sleep(0.2)


def test_poison_celery_submission_ends_rejected_after_bounded_deliveries(
    make_stack: Callable[..., Stack],
    short_deadline_settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(CRASH_DRILL_ENV, MAGIC)
    make_stack(("orchestrator", "cpu"))
    ctx = OrchestratorContext(short_deadline_settings)
    poison = MAGIC.encode() + photo_jpeg(31)
    _send(ctx, poison, idempotency_key="poison-1", reply_to="imgpipe:reply:poison")

    job = _job_by_key(ctx, "poison-1", 180)
    assert job.status == JobStatus.REJECTED and job.reasons == ["crashed_worker"]
    limit = short_deadline_settings.ingest_max_deliveries
    assert job.error is not None and f"died {limit} times" in job.error
    (event,) = _replies(ctx, "imgpipe:reply:poison", 1, 30)
    assert (event["event"], event["job_id"], event["reason"]) == (
        "rejected", job.id, "crashed_worker",
    )  # fmt: skip
    # the delivery clears its counter in a finally after publishing the reply: wait for it
    assert _no_crash_counters(ctx, 10), "counters are cleared"

    # The same stack still takes work, and a malformed Celery submission is answered.
    _send(ctx, photo_jpeg(32), idempotency_key="after-poison")
    _send(ctx, photo_jpeg(33), priority="urgent", reply_to="imgpipe:reply:bad")
    good = _job_by_key(ctx, "after-poison", 60)
    assert wait_jobs(ctx.database_url, [good.id], 90)[good.id] == JobStatus.SUCCEEDED
    (rejection,) = _replies(ctx, "imgpipe:reply:bad", 1, 30)
    assert rejection["event"] == "rejected" and rejection["job_id"] is None
    assert rejection["reason"] == "bad_field" and "'interactive' or 'bulk'" in rejection["error"]
    assert rejection["idempotency_key"].startswith("celery:")
