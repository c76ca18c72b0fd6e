"""A local S3-compatible server for tests: moto's server mode (``moto_server``, the
``moto[server]`` test dependency) as a real subprocess on a free loopback port."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import boto3

__all__ = ["S3Server", "aws_env", "moto_server"]

ACCESS_KEY_ID = "imgpipe-test-key"
SECRET_ACCESS_KEY = "imgpipe-test-secret-3f9a1c"
REGION = "us-east-1"


@dataclass(frozen=True)
class S3Server:
    endpoint_url: str
    log_path: Path

    def env(self) -> dict[str, str]:
        """The AWS_* variables a process needs to use this server (its credentials)."""
        return {
            "AWS_ACCESS_KEY_ID": ACCESS_KEY_ID,
            "AWS_SECRET_ACCESS_KEY": SECRET_ACCESS_KEY,
            "AWS_DEFAULT_REGION": REGION,
        }

    def client(self):  # type: ignore[no-untyped-def]
        return boto3.session.Session(
            aws_access_key_id=ACCESS_KEY_ID,
            aws_secret_access_key=SECRET_ACCESS_KEY,
            region_name=REGION,
        ).client("s3", endpoint_url=self.endpoint_url)

    def new_bucket(self) -> str:
        name = f"imgpipe-test-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _moto_server_command(port: int) -> list[str]:
    script = Path(sys.executable).with_name("moto_server")
    exe = [str(script)] if script.exists() else [shutil.which("moto_server") or "moto_server"]
    return [*exe, "-H", "127.0.0.1", "-p", str(port)]


@contextlib.contextmanager
def moto_server(log_dir: Path, ready_timeout_s: float = 60) -> Iterator[S3Server]:
    """Start ``moto_server`` on a free port; stop it (and its children) afterwards."""
    port = _free_port()
    log_path = log_dir / "moto_server.log"
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            _moto_server_command(port),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + ready_timeout_s
        while True:
            try:
                with urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2):
                    break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"moto_server did not start on port {port} (exit {process.poll()}): "
                        f"{log_path.read_text(errors='replace')[-2000:]}"
                    ) from None
                time.sleep(0.2)
        yield S3Server(endpoint, log_path)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, 15)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)
            process.wait(30)


@contextlib.contextmanager
def aws_env(server: S3Server) -> Iterator[None]:
    """Put the server's credentials into this process's environment (children inherit
    them, as an operator's AWS_* variables would be), and restore it afterwards."""
    saved = {k: os.environ.get(k) for k in server.env()}
    os.environ.update(server.env())
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
