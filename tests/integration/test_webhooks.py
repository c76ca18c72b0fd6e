"""Webhooks: the completed event POSTed to a real local HTTP server that checks the HMAC.

The stack here has its own broker and its own database: its orchestrator must be the only
one that advances these jobs (it is the one with IMGPIPE_WEBHOOK_URL set).
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
import pytest
from PIL import Image

from db.engine import session_scope
from db.migrate import upgrade
from db.models import Job
from imgpipe.broker import EmbeddedRedis
from imgpipe.contracts import JobStatus
from imgpipe.errors import ConfigError
from imgpipe.face.stack import Stack
from imgpipe.settings import Settings
from orchestrator.context import OrchestratorContext
from orchestrator.submit import SubmitRequest, submit
from orchestrator.webhooks import SIGNATURE_HEADER, TIMESTAMP_HEADER, deliver, verify
from tests.support.services import own_database, short_tmp_dir

pytestmark = pytest.mark.timeout(120)

SECRET = "webhook-test-secret"


@dataclass
class Received:
    at: float
    timestamp: str
    signature: str
    body: bytes
    status: int


@dataclass
class Receiver:
    """Answers with the scripted statuses in order (then 200) and records every request."""

    script: list[int] = field(default_factory=list)
    received: list[Received] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def reset(self, script: list[int]) -> None:
        with self.lock:
            self.script = list(script)
            self.received.clear()

    def for_job(self, job_id: str) -> list[Received]:
        with self.lock:
            return [r for r in self.received if json.loads(r.body)["job_id"] == job_id]


@contextmanager
def http_receiver() -> Iterator[tuple[Receiver, str]]:
    receiver = Receiver()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            timestamp = self.headers.get(TIMESTAMP_HEADER, "")
            signature = self.headers.get(SIGNATURE_HEADER, "")
            expected = hmac.new(
                SECRET.encode(), timestamp.encode() + b"." + body, hashlib.sha256
            ).hexdigest()
            with receiver.lock:
                status = receiver.script.pop(0) if receiver.script else 200
                if not hmac.compare_digest(f"sha256={expected}", signature):
                    status = 401
                receiver.received.append(Received(time.time(), timestamp, signature, body, status))
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield receiver, f"http://127.0.0.1:{server.server_address[1]}/hooks/imgpipe"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture(scope="module")
def webhook_stack(database_url: str) -> Iterator[tuple[OrchestratorContext, Receiver]]:
    data_dir = short_tmp_dir("ipw-")
    broker = EmbeddedRedis(data_dir / "redis")
    broker.start()
    with (
        http_receiver() as (receiver, url),
        own_database(database_url) as db_url,
        pytest.MonkeyPatch.context() as env,
    ):
        env.setenv("IMGPIPE_WEBHOOK_URL", url)
        env.setenv("IMGPIPE_WEBHOOK_SECRET", SECRET)
        env.setenv("IMGPIPE_WEBHOOK_MAX_ATTEMPTS", "4")
        env.setenv("IMGPIPE_RETRY_BACKOFF_S", "0.3")
        settings = Settings(
            data_dir=data_dir,
            broker_url=broker.celery_url,
            database_url=db_url,
            blob_url=(data_dir / "blobs").as_uri(),
        )
        upgrade(db_url)
        try:
            with Stack(settings, workers=("orchestrator", "cpu"), stop_timeout_s=10) as stack:
                stack.wait_ready(60)
                yield OrchestratorContext(settings), receiver
        finally:
            broker.stop()
            shutil.rmtree(data_dir, ignore_errors=True)


def photo(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def wait_for(condition: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def finished_job(ctx: OrchestratorContext, job_id: str) -> Job:
    def done() -> bool:
        with session_scope(ctx.database_url) as session:
            job = session.get(Job, job_id)
            return job is not None and JobStatus(job.status).terminal

    wait_for(done, 60, f"job {job_id}")
    with session_scope(ctx.database_url) as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job


def test_completed_event_is_posted_with_a_verifiable_signature(
    webhook_stack: tuple[OrchestratorContext, Receiver],
) -> None:
    ctx, receiver = webhook_stack
    receiver.reset([])
    result = submit(ctx, SubmitRequest(data=photo(1), pipeline="basic", idempotency_key="wh-1"))
    job = finished_job(ctx, result.job_id)
    wait_for(lambda: receiver.for_job(job.id), 30, "the webhook")
    (hit,) = receiver.for_job(job.id)
    assert hit.status == 200, "the receiver verified the signature"
    assert verify(SECRET, hit.timestamp, hit.body, hit.signature)
    assert not verify("another-secret", hit.timestamp, hit.body, hit.signature)
    assert abs(time.time() - int(hit.timestamp)) < 60
    event = json.loads(hit.body)
    assert event["event"] == "completed" and event["idempotency_key"] == "wh-1"
    assert event["status"] == JobStatus.SUCCEEDED and event["verdict"] == job.verdict
    assert event["stages"] == {"quality": "succeeded", "enhance": "succeeded"}


def test_failed_deliveries_are_retried_with_backoff_and_never_hold_the_job(
    webhook_stack: tuple[OrchestratorContext, Receiver],
) -> None:
    ctx, receiver = webhook_stack
    receiver.reset([503, 500])
    result = submit(ctx, SubmitRequest(data=photo(2), pipeline="basic", force=True))
    job = finished_job(ctx, result.job_id)
    wait_for(lambda: len(receiver.for_job(job.id)) == 3, 30, "three deliveries")
    hits = receiver.for_job(job.id)
    assert [h.status for h in hits] == [503, 500, 200]
    assert len({h.body for h in hits}) == 1, "every attempt sends the same event"
    assert all(verify(SECRET, h.timestamp, h.body, h.signature) for h in hits)
    # the delays between them are drawn by the retry policy with full jitter (anywhere
    # from 0 to 0.2 s, then to 0.4 s here): tests/unit/test_retry.py checks the draws
    assert job.finished_at is not None
    assert job.finished_at.timestamp() <= hits[0].at, "the job finished before any delivery"


def test_receiver_refusal_is_final_and_unreachable_receiver_is_retried(
    webhook_stack: tuple[OrchestratorContext, Receiver],
) -> None:
    ctx, receiver = webhook_stack
    receiver.reset([400])
    refused = deliver(ctx.settings, '{"job_id": "x"}')
    assert (refused.delivered, refused.retry) == (False, False)
    assert "400" in refused.detail
    wrong_secret = ctx.settings.model_copy(update={"webhook_secret": "not-the-secret"})
    assert deliver(wrong_secret, '{"job_id": "x"}').detail.startswith("HTTP 401")
    closed = ctx.settings.model_copy(update={"webhook_url": "http://127.0.0.1:9/none"})
    unreachable = deliver(closed, '{"job_id": "x"}', timeout_s=2)
    assert (unreachable.delivered, unreachable.retry) == (False, True)
    assert "cannot reach" in unreachable.detail


def test_webhook_needs_a_secret_and_an_http_url(
    webhook_stack: tuple[OrchestratorContext, Receiver],
) -> None:
    ctx, _receiver = webhook_stack
    unsigned = ctx.settings.model_copy(update={"webhook_secret": None})
    with pytest.raises(ConfigError, match="IMGPIPE_WEBHOOK_SECRET"):
        deliver(unsigned, "{}")
    local_file = ctx.settings.model_copy(update={"webhook_url": "file:///etc/passwd"})
    with pytest.raises(ConfigError, match="http:// or https://"):
        deliver(local_file, "{}")
