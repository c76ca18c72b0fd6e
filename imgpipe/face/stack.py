"""Running the whole service on one machine: embedded broker + worker processes.

Every child runs in its own session (process group). Stopping the stack sends SIGTERM to
each child's main process only (a warm shutdown: the batch or task in hand finishes, its
own children are stopped by it), then SIGKILL to the whole group of whatever is left
after ``stop_timeout_s``. Nothing is left behind.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from imgpipe.broker import EmbeddedRedis
from imgpipe.errors import TransientError
from imgpipe.settings import Settings

__all__ = ["Stack", "child_env"]

log = logging.getLogger(__name__)

# The `celery` command line lets these bare variables override the app's config; a
# stray BROKER_URL in the environment must not redirect imgpipe's workers.
# Children that answer no Celery ping: Flower and the submit-stream consumer.
NOT_CELERY_WORKERS = frozenset({"flower", "ingest"})

SUPERVISE_INTERVAL_S = 0.5
RESTART_LIMIT = 5
RESTART_WINDOW_S = 60.0

_CELERY_ENV_OVERRIDES = ("BROKER_URL", "RESULT_BACKEND", "APP", "CONFIG_MODULE", "LOADER")


def child_env(settings: Settings, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in _CELERY_ENV_OVERRIDES and not k.startswith("IMGPIPE_")
    }
    env.update(settings.to_env())
    env["IMGPIPE_DATA_DIR"] = str(settings.resolved_data_dir)
    env["IMGPIPE_BROKER_URL"] = settings.effective_broker_url
    env["IMGPIPE_DATABASE_URL"] = settings.effective_database_url
    env["IMGPIPE_BLOB_URL"] = settings.effective_blob_url
    env["IMGPIPE_REDIS_URL"] = settings.effective_redis_url
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.update(extra or {})
    return env


@dataclass
class Child:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    command: list[str]
    restarts: list[float] = field(default_factory=list)
    """Monotonic times of automatic restarts (bounded by RESTART_LIMIT per window)."""
    given_up: bool = False


@dataclass
class Stack:
    settings: Settings
    workers: tuple[str, ...] = ("orchestrator", "cpu", "gpu")
    gpu_device: str = "cpu"
    flower: bool = False
    stop_timeout_s: float = 30.0
    supervise: bool = True
    """Restart a worker that exits unexpectedly (e.g. Celery's "Unrecoverable error" after
    a broker connection loss), at most RESTART_LIMIT times per RESTART_WINDOW_S."""
    children: list[Child] = field(default_factory=list)
    broker: EmbeddedRedis | None = None
    _supervisor: threading.Thread | None = field(default=None, repr=False)
    _stopping: threading.Event = field(default_factory=threading.Event, repr=False)
    _lock: threading.RLock = field(default_factory=threading.RLock, repr=False)

    @property
    def log_dir(self) -> Path:
        return self.settings.resolved_data_dir / "logs"

    def start(self) -> None:
        from db.migrate import upgrade

        self.settings.resolved_data_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        if self.settings.uses_embedded_broker:
            self.broker = EmbeddedRedis(
                self.settings.resolved_data_dir, self.settings.embedded_socket_path
            )
            self.broker.start()
        upgrade(self.settings.effective_database_url)
        for role in self.workers:
            self._spawn(role, self._command(role))
        if self.flower:
            self._spawn("flower", self._flower_command())
        if self.supervise:
            self._stopping.clear()
            self._supervisor = threading.Thread(
                target=self._supervise_loop, name="imgpipe-supervisor", daemon=True
            )
            self._supervisor.start()

    def _supervise_loop(self) -> None:
        while not self._stopping.wait(SUPERVISE_INTERVAL_S):
            with self._lock:
                if self._stopping.is_set():
                    return
                for child in list(self.children):
                    if child.given_up or child.process.poll() is None:
                        continue
                    now = time.monotonic()
                    recent = [t for t in child.restarts if now - t < RESTART_WINDOW_S]
                    if len(recent) >= RESTART_LIMIT:
                        log.error(
                            "%s exited (code %s) %d times within %.0f s; not restarting it. "
                            "See %s",
                            child.name, child.process.returncode, len(recent),
                            RESTART_WINDOW_S, child.log_path,
                        )  # fmt: skip
                        child.given_up = True
                        continue
                    log.warning(
                        "%s exited with code %s; restarting it (see %s)",
                        child.name, child.process.returncode, child.log_path,
                    )  # fmt: skip
                    _signal_group(child.process, signal.SIGKILL)  # its pool children too
                    self.children.remove(child)
                    self._spawn(child.name, child.command)
                    self.children[-1].restarts = [*recent, now]

    def add_gpu_worker(self, device: str) -> None:
        """One more model worker pinned to ``device`` (``cuda:N`` or ``cpu``)."""
        command = [sys.executable, "-m", "imgpipe", "worker", "gpu", "--device", device]
        self._spawn(f"gpu-{device.replace(':', '')}", command)

    def _command(self, role: str) -> list[str]:
        base = [sys.executable, "-m", "imgpipe"]
        if role == "orchestrator":
            return [*base, "orchestrator"]
        if role == "cpu":
            return [*base, "worker", "cpu"]
        if role == "gpu":
            return [*base, "worker", "gpu", "--device", self.gpu_device]
        if role == "ingest":
            return [*base, "ingest"]
        raise ValueError(f"unknown worker role {role!r}")

    def _flower_command(self) -> list[str]:
        password = self.settings.flower_password
        assert password is not None
        return [
            sys.executable, "-m", "celery",
            "--broker", self.settings.effective_broker_url,
            "flower",
            "--address=127.0.0.1",
            f"--port={self.settings.flower_port}",
            f"--basic-auth={self.settings.flower_user}:{password}",
            f"--db={self.settings.resolved_data_dir / 'flower.db'}",
        ]  # fmt: skip

    def _spawn(self, name: str, command: list[str]) -> None:
        log_path = self.log_dir / f"{name}.log"
        with log_path.open("ab") as log_file:
            process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=child_env(self.settings),
                start_new_session=True,
            )
        self.children.append(Child(name, process, log_path, command))

    def child(self, name: str) -> Child:
        for child in self.children:
            if child.name == name:
                return child
        raise KeyError(f"no child process named {name!r}")

    def kill(self, name: str, sig: signal.Signals = signal.SIGKILL) -> None:
        """Signal a child's whole process group (tests use SIGKILL to simulate a crash).

        The supervisor (if on) restarts it like any other crash."""
        with self._lock:
            child = self.child(name)
            _signal_group(child.process, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.process.wait(10)

    def check_alive(self) -> list[str]:
        """Children that exited for good (with their log path) — empty when all run.

        With supervision on, a child that exited is restarted and counts as dead only
        once it has used up its restarts.
        """
        with self._lock:
            return [
                f"{c.name} (exit {c.process.returncode}, see {c.log_path})"
                for c in self.children
                if c.process.poll() is not None and (c.given_up or not self.supervise)
            ]

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        """Block until every started worker answers a broadcast ping.

        Raises TransientError if a child exits or the timeout passes (with log tails).
        """
        from imgpipe.celery_app import create_app

        expected = sum(1 for c in self.children if c.name not in NOT_CELERY_WORKERS)
        app = create_app(self.settings)
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                dead = self.check_alive()
                if dead:
                    raise TransientError(f"worker exited during start: {', '.join(dead)}")
                replies = app.control.ping(timeout=0.5) or []
                if len(replies) >= expected:
                    return
                if time.monotonic() > deadline:
                    raise TransientError(
                        f"{len(replies)} of {expected} workers answered within {timeout_s:.0f} s; "
                        f"see the logs in {self.log_dir}"
                    )
        finally:
            app.close()

    def stop(self) -> None:
        self._stopping.set()
        if self._supervisor is not None:
            self._supervisor.join(timeout=5)
            self._supervisor = None
        for child in self.children:
            # The main process only: Celery's warm shutdown lets pool children finish the
            # task in hand (a SIGTERM to the whole group killed them mid-stage).
            with contextlib.suppress(ProcessLookupError):
                child.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.stop_timeout_s
        for child in self.children:
            remaining = max(0.1, deadline - time.monotonic())
            try:
                child.process.wait(remaining)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in time; killing it", child.name)
        for child in self.children:
            # Pool children of a worker that exited can outlive it: kill the whole group.
            _signal_group(child.process, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.process.wait(5)
        self.children.clear()
        if self.broker is not None:
            self.broker.stop()
            self.broker = None

    def __enter__(self) -> Stack:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _signal_group(process: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, sig)
