"""The compose stack's commands run here without Docker: each imgpipe service of
compose/docker-compose.yml (with the S3 overlay) becomes a process with that service's
command and variables, secrets as files; redis and postgres are the test's own (an
embedded redis-server, the test database), S3 is moto_server. Services built without
torch (TORCH=none) run with torch imports refused, as in their image. A job goes in
through the submit stream (ingest), through every stage worker, blobs on S3, and every
service's health check passes."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from db.engine import session_scope
from db.models import Job
from imgpipe.broker import EmbeddedRedis
from tests.clients.submit_client import SubmitClient
from tests.support.compose import ComposeService, imgpipe_command, load_compose
from tests.support.s3server import S3Server
from tests.support.services import own_database, short_tmp_dir

pytestmark = pytest.mark.one_backend("postgresql")

REPO = Path(__file__).resolve().parents[2]
NO_TORCH = REPO / "tests" / "support" / "notorch"
SAMPLE = REPO / "samples" / "astronaut.jpg"
STOP_TIMEOUT_S = 120


class ServiceProcesses:
    """One process per compose service, in its own session, logging to a file."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.running: dict[str, subprocess.Popen[bytes]] = {}

    def argv(self, service: ComposeService, args: list[str]) -> list[str]:
        imgpipe_command(args)  # the same command the container runs, parsed
        if service.name.startswith("gpu-worker"):
            args = [a if a != "cuda:0" else "cpu" for a in args]  # no GPU on this machine
        return [sys.executable, "-m", "imgpipe", *args[1:]]

    def env(self, service: ComposeService, secrets: dict[str, Path]) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("IMGPIPE_")}
        env.update(service.env)
        for key, value in service.env.items():
            if value.startswith("/run/secrets/"):
                env[key] = str(secrets[value.removeprefix("/run/secrets/")])
        data_dir = self.workdir / service.name  # each container has its own file system
        data_dir.mkdir(exist_ok=True)
        env["IMGPIPE_DATA_DIR"] = str(data_dir)
        core = service.raw["build"]["args"]["TORCH"] == "none"
        env["PYTHONPATH"] = f"{NO_TORCH}{os.pathsep}{REPO}" if core else str(REPO)
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def run_once(self, service: ComposeService, env: dict[str, str]) -> None:
        done = subprocess.run(
            self.argv(service, service.command), env=env, cwd=self.workdir,
            capture_output=True, text=True, timeout=300, check=False,
        )  # fmt: skip
        assert done.returncode == 0, f"{service.name}: {done.stderr[-3000:]}"

    def start(self, service: ComposeService, env: dict[str, str]) -> None:
        with (self.workdir / f"{service.name}.log").open("ab") as log:
            self.running[service.name] = subprocess.Popen(
                self.argv(service, service.command), env=env, cwd=self.workdir,
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
            for p in sorted(self.workdir.glob("*.log"))
        )

    def stop(self) -> None:
        for process in self.running.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGTERM)
        for process in self.running.values():
            try:
                process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(30)


@pytest.fixture
def workdir() -> Iterator[Path]:
    directory = short_tmp_dir("ipcmp-")
    yield directory
    import shutil

    shutil.rmtree(directory, ignore_errors=True)


def _secrets(
    workdir: Path, broker: EmbeddedRedis, database_url: str, s3: S3Server
) -> dict[str, Path]:
    creds = s3.env()
    values = {
        "broker_url": broker.celery_url,
        "database_url": database_url,
        "aws_credentials": "[default]\n"
        f"aws_access_key_id = {creds['AWS_ACCESS_KEY_ID']}\n"
        f"aws_secret_access_key = {creds['AWS_SECRET_ACCESS_KEY']}\n",
    }
    paths = {}
    (workdir / "secrets").mkdir(mode=0o700)
    for name, value in values.items():
        paths[name] = workdir / "secrets" / name
        paths[name].write_text(value + "\n")
    return paths


@pytest.mark.slow
def test_the_compose_services_see_a_job_through_without_docker(
    own_broker: EmbeddedRedis, database_url: str, s3_server: S3Server, workdir: Path
) -> None:
    _base, services = load_compose("docker-compose.s3.yml")
    bucket = s3_server.new_bucket()
    processes = ServiceProcesses(workdir)
    with own_database(database_url) as db_url:
        secrets = _secrets(workdir, own_broker, db_url, s3_server)
        envs = {}
        for name, service in services.items():
            if not service.is_imgpipe or name == "flower":
                continue  # redis and postgres are the test's own; Flower: test_flower
            env = processes.env(service, secrets)
            env["IMGPIPE_BLOB_URL"] = f"s3://{bucket}/compose"
            env["IMGPIPE_S3_ENDPOINT_URL"] = s3_server.endpoint_url
            # only the file from the overlay's secret may supply the credentials
            env.pop("AWS_ACCESS_KEY_ID", None)
            env.pop("AWS_SECRET_ACCESS_KEY", None)
            env["AWS_EC2_METADATA_DISABLED"] = "true"
            envs[name] = env
        # migrate first: every other service waits for it to complete successfully
        processes.run_once(services["migrate"], envs.pop("migrate"))
        try:
            for name, env in envs.items():
                processes.start(services[name], env)
            client = SubmitClient(own_broker.client())
            key = f"compose-{uuid.uuid4().hex[:8]}"
            reply_to = f"imgpipe:reply:{key}"
            client.submit(
                image=SAMPLE.read_bytes(), pipeline="full", idempotency_key=key, reply_to=reply_to
            )
            final = client.wait_final(reply_to, [key], timeout_s=600)
            assert key in final, f"no final event for {key}\n{processes.logs()}"
            event = final[key]
            assert event["event"] == "completed", f"{event}\n{processes.logs()}"
            with session_scope(db_url) as session:
                job = session.get(Job, event["job_id"])
                assert job is not None, event
                stages = {run.stage: run.status for run in job.stage_runs}
                assert job.status == "succeeded", (job.error, stages, processes.logs())
            assert stages == {
                "quality": "succeeded",
                "enhance": "succeeded",
                "detect": "succeeded",
                "moderate": "succeeded",
                "anomaly": "skipped",  # no profile configured: skipped, never made up
            }, stages
            objects = s3_server.client().list_objects_v2(Bucket=bucket, Prefix="compose/")
            assert objects.get("KeyCount", 0) >= 1, "the upload is stored on S3"
            for name, service in services.items():
                if name not in envs:
                    continue
                test = service.healthcheck["test"]  # type: ignore[index]
                assert test[:2] == ["CMD", "imgpipe"], (name, test)
                check = subprocess.run(
                    processes.argv(service, test[1:]), env=envs[name], cwd=workdir,
                    capture_output=True, text=True, timeout=120, check=False,
                )  # fmt: skip
                assert check.returncode == 0, f"{name}: {check.stdout} {check.stderr}"
                assert check.stdout.startswith("healthy"), check.stdout
            logs = processes.logs()
            assert "(blocked)" not in logs, "a core service tried to import torch"
            for secret in ("aws_secret_access_key", s3_server.env()["AWS_SECRET_ACCESS_KEY"]):
                assert secret not in logs
        finally:
            processes.stop()
    for name, process in processes.running.items():
        assert process.returncode is not None, f"{name} still running"
