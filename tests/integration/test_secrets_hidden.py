"""No credential on any command line, in the CLI's output or in a log: ``imgpipe up`` on
a password-protected Redis, with Flower's password from a file."""

from __future__ import annotations

import base64
import os
import shutil
import signal
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from db.migrate import upgrade
from tests.integration.test_password_redis import PASSWORD, free_port, password_redis
from tests.support.services import short_tmp_dir
from tests.support.upstack import UpProcess, alive, cmdline, descendants, processes_with_env

__all__ = ["password_redis"]  # the fixture, used by name

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

FLOWER_PASSWORD = "flower-Pw-7f3a"


def http_status(url: str, user_password: str | None = None) -> int:
    request = urllib.request.Request(url)
    if user_password is not None:
        token = base64.b64encode(user_password.encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def wait_http(url: str, user_password: str, tries: int = 300) -> int:
    status = 0
    for _ in range(tries):
        try:
            status = http_status(url, user_password)
        except OSError:
            status = 0
        if status:
            return status
        time.sleep(0.2)
    return status


def test_no_password_on_argv_in_output_or_logs(password_redis: str, tmp_path: Path) -> None:
    data_dir = short_tmp_dir("ipsec-")
    password_file = tmp_path / "flower-password"
    password_file.write_text(FLOWER_PASSWORD + "\n")
    port = free_port()
    upgrade(f"sqlite:///{data_dir / 'imgpipe.db'}")
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMGPIPE_")}
    env |= {
        "IMGPIPE_DATA_DIR": str(data_dir),
        "IMGPIPE_BROKER_URL": password_redis,
        "IMGPIPE_FLOWER_PASSWORD_FILE": str(password_file),
        "IMGPIPE_FLOWER_PORT": str(port),
    }
    up = UpProcess(env, tmp_path / "up.out", ["--device", "cpu"])
    try:
        up.wait_ready()
        base = f"http://127.0.0.1:{port}"
        assert wait_http(f"{base}/workers", f"admin:{FLOWER_PASSWORD}") == 200
        assert http_status(f"{base}/workers") == 401, "Flower asks for its password"
        tree = descendants(up.pid)
        commands = {pid: cmdline(pid) for pid in [up.pid, *tree]}
        assert any("flower" in c for c in commands.values()), commands
        for pid, command in commands.items():
            assert PASSWORD not in command, f"broker password on the argv of {pid}: {command}"
            assert FLOWER_PASSWORD not in command, f"Flower password on argv of {pid}"
        assert up.stop(signal.SIGTERM) == 0, up.output()[-3000:]
        assert alive(tree) == set()
    finally:
        if up.process.poll() is None:
            up.kill_everything()
        for pid in processes_with_env(f"IMGPIPE_DATA_DIR={data_dir}"):
            os.kill(pid, signal.SIGKILL)
    output = up.output()
    assert "redis://:***@127.0.0.1" in output, output
    logs = {p.name: p.read_text(errors="replace") for p in (data_dir / "logs").glob("*.log")}
    assert {"orchestrator.log", "cpu.log", "ingest.log", "flower.log"} <= set(logs)
    for name, text in [("imgpipe up output", output), *logs.items()]:
        assert PASSWORD not in text, f"the broker password is in {name}"
        assert FLOWER_PASSWORD not in text, f"Flower's password is in {name}"
    shutil.rmtree(data_dir, ignore_errors=True)
