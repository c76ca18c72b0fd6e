"""``imgpipe flower`` as a real Flower process (401 without credentials, the tasks of a
run with them) and a standalone ``imgpipe worker cpu`` serving its own /metrics."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from db.migrate import upgrade
from imgpipe.broker import EmbeddedRedis
from imgpipe.face.stack import Stack, child_env
from imgpipe.settings import Settings
from orchestrator.context import OrchestratorContext
from orchestrator.submit import SubmitRequest, submit
from tests.integration.conftest import make_settings
from tests.integration.test_observability import png_bytes
from tests.support.jobs import wait_jobs
from tests.support.observe import REPO, sample_sum, scrape
from tests.support.services import own_database
from tests.support.upstack import cmdline

pytestmark = [pytest.mark.slow, pytest.mark.one_backend("sqlite")]

PASSWORD = "flower-test-pw"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http(url: str, auth: tuple[str, str] | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url)
    if auth is not None:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@contextlib.contextmanager
def imgpipe_process(
    settings: Settings, args: list[str], env: dict[str, str], log: Path
) -> Iterator[subprocess.Popen[bytes]]:
    full_env = child_env(settings, {"PYTHONPATH": str(REPO), **env})
    with log.open("ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "imgpipe", *args],
            cwd=REPO, env=full_env, stdin=subprocess.DEVNULL, stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        yield process
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)


def wait_until(check: Any, what: str, log: Path, attempts: int = 600) -> Any:
    """Poll ``check()`` every 0.1 s until it returns a truthy value."""
    for _ in range(attempts):
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"{what} did not happen; log:\n{log.read_text(errors='replace')[-3000:]}")


def test_imgpipe_flower_requires_credentials_and_lists_the_tasks_of_a_run(
    own_broker: EmbeddedRedis, database_url: str, tmp_path: Path
) -> None:
    port = free_port()
    with own_database(database_url) as url:
        upgrade(url)
        settings = make_settings(own_broker, url)
        env = {"IMGPIPE_FLOWER_PASSWORD": PASSWORD, "IMGPIPE_FLOWER_PORT": str(port)}
        log = tmp_path / "flower.out"
        base = f"http://127.0.0.1:{port}"
        with (
            Stack(settings, workers=("orchestrator", "cpu"), stop_timeout_s=15) as stack,
            imgpipe_process(settings, ["flower"], env, log) as flower,
        ):
            stack.wait_ready(120)
            auth = ("admin", PASSWORD)

            def answers() -> bool:
                assert flower.poll() is None, log.read_text()
                try:
                    return http(f"{base}/api/workers", auth)[0] == 200
                except (ConnectionError, urllib.error.URLError):
                    return False

            wait_until(answers, "Flower answering", log)
            assert http(f"{base}/")[0] == 401
            assert http(f"{base}/api/tasks")[0] == 401
            assert http(f"{base}/api/tasks", ("admin", "wrong"))[0] == 401
            ctx = OrchestratorContext(settings)
            request = SubmitRequest(data=png_bytes(5), pipeline="noop", force=True)
            job_id = submit(ctx, request).job_id
            wait_jobs(url, [job_id], 120)

            def stage_tasks() -> list[dict[str, Any]]:
                status, body = http(f"{base}/api/tasks", auth)
                assert status == 200
                tasks = json.loads(body).values()
                return [t for t in tasks if str(t.get("name", "")).startswith("imgpipe.stage.")]

            tasks = wait_until(stage_tasks, "stage tasks listed in Flower", log)
            assert {t["name"] for t in tasks} == {"imgpipe.stage.noop"}
            assert all(t["args"].startswith("[") and t["args"][1].isdigit() for t in tasks)
            assert "Flower on http://127.0.0.1" in log.read_text()
            assert PASSWORD not in cmdline(flower.pid)


def test_standalone_cpu_worker_serves_metrics_of_its_forked_consumers(
    own_broker: EmbeddedRedis, database_url: str, tmp_path: Path
) -> None:
    """`imgpipe worker cpu` with IMGPIPE_METRICS_PORT: its consumer processes record, the
    parent serves what they recorded; no stack state (that is the orchestrator's)."""
    port = free_port()
    with own_database(database_url) as url:
        upgrade(url)
        settings = make_settings(own_broker, url)
        log = tmp_path / "worker.out"
        env = {"IMGPIPE_METRICS_PORT": str(port), "IMGPIPE_LOG_FORMAT": "json"}
        with imgpipe_process(settings, ["worker", "cpu"], env, log) as worker:
            metrics_url = f"http://127.0.0.1:{port}/metrics"

            def serving() -> bool:
                assert worker.poll() is None, log.read_text()
                try:
                    return http(metrics_url)[0] == 200
                except (ConnectionError, urllib.error.URLError):
                    return False

            wait_until(serving, "the worker serving /metrics", log)
            ctx = OrchestratorContext(settings)
            jobs = [
                submit(ctx, SubmitRequest(data=png_bytes(s), pipeline="noop", force=True)).job_id
                for s in (11, 12)
            ]
            wait_jobs(url, jobs, 120)  # the worker's own persist steps the noop DAG
            samples = scrape(metrics_url)
            assert sample_sum(samples, "imgpipe_stage_runs_total", device="cpu") >= 10
            assert "imgpipe_queue_depth" not in samples
            metrics_dir = Path(settings.resolved_data_dir) / "metrics"
            assert [p.name for p in metrics_dir.iterdir()] == [f"cpu-{worker.pid}"]
        assert any('"metrics on http://' in line for line in log.read_text().splitlines())
