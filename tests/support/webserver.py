"""``imgpipe serve`` as a real process on a free localhost port, for the web tests."""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import requests

from db.apikeys import Scope, create_key
from imgpipe.face.stack import child_env
from imgpipe.settings import Settings

__all__ = ["ApiServer", "api_server", "free_port", "new_key"]

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 60.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class ApiServer:
    base_url: str
    settings: Settings
    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def url(self, path: str) -> str:
        return self.base_url + path


def new_key(settings: Settings, name: str, *scopes: Scope) -> str:
    token, _info = create_key(settings.effective_database_url, name, scopes)
    return token


@contextmanager
def api_server(settings: Settings, log_path: Path) -> Iterator[ApiServer]:
    """Start ``python -m imgpipe serve`` with ``settings`` (as ``imgpipe up`` would) and
    wait until /healthz answers; SIGTERM it afterwards."""
    port = free_port()
    env = child_env(settings, {"IMGPIPE_API_PORT": str(port), "PYTHONPATH": str(REPO)})
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "imgpipe", "serve"],
            cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    server = ApiServer(f"http://127.0.0.1:{port}", settings, process, log_path)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if process.poll() is not None:
                raise AssertionError(f"imgpipe serve exited {process.returncode}:\n{server.log()}")
            with contextlib.suppress(requests.ConnectionError):
                if requests.get(server.url("/healthz"), timeout=5).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise AssertionError(f"imgpipe serve did not answer /healthz:\n{server.log()}")
            time.sleep(0.1)
        yield server
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
