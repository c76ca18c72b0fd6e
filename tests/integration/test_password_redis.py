"""A plain redis:// URL with a password works the same way as the embedded socket."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from imgpipe.broker import redis_server_binary
from imgpipe.contracts import JobStatus
from imgpipe.face.stack import Stack
from orchestrator.context import OrchestratorContext
from orchestrator.submit import SubmitRequest, submit
from tests.integration.conftest import make_settings
from tests.support.jobs import wait_jobs
from tests.support.services import short_tmp_dir

PASSWORD = "s3cret-imgpipe"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def password_redis() -> Iterator[str]:
    directory = short_tmp_dir("ippw-")
    port = free_port()
    process = subprocess.Popen(
        [
            str(redis_server_binary()), "--port", str(port), "--bind", "127.0.0.1",
            "--requirepass", PASSWORD, "--save", "", "--dir", str(directory),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    client = redis.Redis(port=port, password=PASSWORD)
    for _ in range(200):
        try:
            client.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.02)
    yield f"redis://:{PASSWORD}@127.0.0.1:{port}/0"
    process.terminate()
    process.wait(10)
    shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.timeout(120)
def test_stack_on_a_password_protected_redis_url(
    password_redis: str, tmp_path: Path, samples_dir: Path
) -> None:
    url = password_redis
    with pytest.raises(redis.AuthenticationError):
        redis.Redis.from_url(url.replace(PASSWORD, "wrong")).ping()
    settings = make_settings(
        broker=None,
        database_url=f"sqlite:///{tmp_path / 'pw.db'}",
        broker_url=url,
    )
    from db.migrate import upgrade

    upgrade(settings.effective_database_url)
    with Stack(settings, workers=("orchestrator", "cpu"), stop_timeout_s=10) as stack:
        stack.wait_ready(60)
        ctx = OrchestratorContext(settings)
        data = (samples_dir / "coffee.jpg").read_bytes()
        result = submit(ctx, SubmitRequest(data=data, pipeline="basic"))
        assert (
            wait_jobs(ctx.database_url, [result.job_id], 60)[result.job_id] == JobStatus.SUCCEEDED
        )
    assert redis.Redis.from_url(url).xlen("imgpipe:events") >= 3
