"""Running the whole service on one machine: embedded broker + worker processes.

Every child runs in its own session (process group), so a Ctrl-C in the terminal reaches
``imgpipe up`` alone and the stack decides how its children stop. ``stop`` stops them in
order, each step a warm shutdown of the main process only (SIGTERM: the batch or task in
hand finishes within its time limit, un-started work goes back to the broker), then
SIGKILL to the whole group of whatever is left after ``stop_timeout_s``:

1. ``ingest`` and ``api`` (no new jobs), 2. the stage workers (``cpu``, ``gpu*``), 3. the
``orchestrator``, 4. Flower, 5. the embedded broker (SHUTDOWN: its append-only file is
flushed), last because everything before it still hands work back through it.

The supervisor thread restarts a child that exits, and the embedded redis-server if it
dies (same socket, same configuration, same data dir: its append-only file brings the
queues back); both at most RESTART_LIMIT times per RESTART_WINDOW_S. It also rotates the
children's log files past ``log_max_bytes`` (imgpipe/face/logrotate.py).

With ``metrics_port`` set, the stack serves ``/metrics`` from this process: what its
children record (``PROMETHEUS_MULTIPROC_DIR`` = ``data_dir/metrics/stack``, emptied at
start) and the state read at scrape time (imgpipe/face/metrics_server.py). Children never
serve their own (``IMGPIPE_METRICS_PORT=0`` in their environment).
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
from typing import TYPE_CHECKING

from imgpipe.broker import EmbeddedRedis
from imgpipe.errors import TransientError
from imgpipe.face.flower import flower_command, flower_env
from imgpipe.face.logrotate import rotate_all
from imgpipe.face.metrics_dirs import MULTIPROC_ENV, fresh_multiproc_dir
from imgpipe.face.stopsignals import signals_deferred
from imgpipe.redact import redact_url
from imgpipe.settings import DEFAULT_STAGE_TIME_LIMIT_S, Settings

if TYPE_CHECKING:
    from imgpipe.face.metrics_server import MetricsServer

__all__ = ["STOP_ORDER", "Stack", "child_env", "warm_stop_timeout_s"]

log = logging.getLogger(__name__)

# Children that answer no Celery ping: Flower, the submit-stream consumer, the HTTP API.
NOT_CELERY_WORKERS = frozenset({"flower", "ingest", "api"})
# Entry points stop first (no new jobs), in the same step.
_ENTRY_POINTS = frozenset({"ingest", "api"})

SUPERVISE_INTERVAL_S = 0.5
RESTART_LIMIT = 5
RESTART_WINDOW_S = 60.0

STOP_GRACE_S = 40.0
"""Past a stage's time limit, how long a stopping worker may take: its watchdog ends a
batch 30 s past the batch's longest limit (workers/batching.py WATCHDOG_GRACE_S), plus
10 s to hand work back and close its connections."""

STOP_ORDER = ("ingest", "stage workers", "orchestrator", "flower")
"""The order ``Stack.stop`` stops its children in (the embedded broker goes last)."""

# The `celery` command line lets these bare variables override the app's config; a
# stray BROKER_URL in the environment must not redirect imgpipe's workers.
_CELERY_ENV_OVERRIDES = ("BROKER_URL", "RESULT_BACKEND", "APP", "CONFIG_MODULE", "LOADER")


def warm_stop_timeout_s(settings: Settings) -> float:
    """How long a warm shutdown may take: the longest stage time limit + STOP_GRACE_S."""
    limits = settings.stage_time_limits_s.values()
    return float(max(limits, default=DEFAULT_STAGE_TIME_LIMIT_S)) + STOP_GRACE_S


def child_env(settings: Settings, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a child: every setting as ``IMGPIPE_*`` (credentials included,
    so that none has to be on a command line), without the variables that would
    override Celery's configuration."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in _CELERY_ENV_OVERRIDES and k != MULTIPROC_ENV and not k.startswith("IMGPIPE_")
    }
    env.update(settings.to_env())
    env["IMGPIPE_DATA_DIR"] = str(settings.resolved_data_dir)
    env["IMGPIPE_BROKER_URL"] = settings.effective_broker_url
    env["IMGPIPE_DATABASE_URL"] = settings.effective_database_url
    env["IMGPIPE_BLOB_URL"] = settings.effective_blob_url
    env["IMGPIPE_REDIS_URL"] = settings.effective_redis_url
    # The stack serves /metrics (or nobody does): no child binds a metrics port.
    env["IMGPIPE_METRICS_PORT"] = "0"
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.update(extra or {})
    return env


def _stop_step(name: str) -> int:
    """Index in STOP_ORDER of the child ``name`` (``cpu``, ``gpu``, ``gpu-cuda0``: stage
    workers; ``api`` stops with ``ingest``)."""
    if name in _ENTRY_POINTS:
        return STOP_ORDER.index("ingest")
    if name in STOP_ORDER:
        return STOP_ORDER.index(name)
    return STOP_ORDER.index("stage workers")


@dataclass
class Child:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    command: list[str]
    extra_env: dict[str, str] = field(default_factory=dict)
    restarts: list[float] = field(default_factory=list)
    """Monotonic times of automatic restarts (bounded by RESTART_LIMIT per window)."""
    given_up: bool = False


@dataclass
class Stack:
    settings: Settings
    workers: tuple[str, ...] = ("orchestrator", "cpu", "gpu")
    gpu_device: str = "cpu"
    flower: bool = False
    stop_timeout_s: float | None = None
    """How long each step of ``stop`` waits for warm shutdowns before SIGKILL; unset:
    ``warm_stop_timeout_s`` (running stages may finish within their time limit)."""
    metrics_port: int | None = None
    """Serve ``/metrics`` on this port (0: any free one; None: no metrics; see
    imgpipe/face/metrics_server.py and ``metrics_url``)."""
    metrics_required: bool = True
    """False: a port in use only leaves metrics off (logged) instead of failing the start."""
    supervise: bool = True
    """Restart a worker that exits unexpectedly (e.g. Celery's "Unrecoverable error" after
    a broker connection loss) and the embedded redis-server if it dies, at most
    RESTART_LIMIT times per RESTART_WINDOW_S each."""
    children: list[Child] = field(default_factory=list)
    broker: EmbeddedRedis | None = None
    broker_restarts: list[float] = field(default_factory=list)
    _supervisor: threading.Thread | None = field(default=None, repr=False)
    _stopping: threading.Event = field(default_factory=threading.Event, repr=False)
    _lock: threading.RLock = field(default_factory=threading.RLock, repr=False)
    _metrics: MetricsServer | None = field(default=None, repr=False)

    @property
    def log_dir(self) -> Path:
        return self.settings.resolved_data_dir / "logs"

    @property
    def metrics_dir(self) -> Path | None:
        """Where the children record metrics (None: metrics off)."""
        if self.metrics_port is None:
            return None
        return self.settings.resolved_data_dir / "metrics" / "stack"

    @property
    def metrics_url(self) -> str | None:
        if self._metrics is None:
            return None
        return f"http://{self.settings.metrics_address}:{self._metrics.port}/metrics"

    @property
    def effective_stop_timeout_s(self) -> float:
        if self.stop_timeout_s is not None:
            return self.stop_timeout_s
        return warm_stop_timeout_s(self.settings)

    def start(self) -> None:
        from db.migrate import upgrade

        self.settings.resolved_data_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        if self.settings.uses_embedded_broker:
            broker = EmbeddedRedis(
                self.settings.resolved_data_dir, self.settings.embedded_socket_path
            )
            with signals_deferred():
                self.broker = broker
                broker.start()
        upgrade(self.settings.effective_database_url)
        if self.metrics_dir is not None and self.metrics_port is not None:
            from imgpipe.face.metrics_server import serve_stack_metrics

            self._metrics = serve_stack_metrics(
                self.settings, self.metrics_port, fresh_multiproc_dir(self.metrics_dir),
                required=self.metrics_required,
            )  # fmt: skip
        for role in self.workers:
            self._spawn(role, self._command(role))
        if self.flower:
            self._spawn("flower", flower_command(), flower_env(self.settings))
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
                self._supervise_broker()
                self._rotate_logs()
                for child in list(self.children):
                    if child.given_up or child.process.poll() is None:
                        continue
                    self._restart_child(child)

    def _rotate_logs(self) -> None:
        paths = [c.log_path for c in self.children]
        if self.broker is not None:
            paths.append(self.broker.log_path)
        rotate_all(paths, self.settings.log_max_bytes, self.settings.log_backups)

    def _supervise_broker(self) -> None:
        broker = self.broker
        if broker is None or broker.process is None or broker.process.poll() is None:
            return
        code = broker.process.returncode
        now = time.monotonic()
        recent = [t for t in self.broker_restarts if now - t < RESTART_WINDOW_S]
        if len(recent) >= RESTART_LIMIT:
            if broker.process is not None:
                log.error(
                    "the embedded redis-server exited (code %s) %d times within %.0f s; not "
                    "restarting it. See %s",
                    code, len(recent), RESTART_WINDOW_S, broker.log_path,
                )  # fmt: skip
                broker.process = None
            return
        log.warning(
            "the embedded redis-server (pid %d) exited with code %s; restarting it on %s "
            "with the same configuration (see %s)",
            broker.process.pid, code, broker.socket_path, broker.log_path,
        )  # fmt: skip
        self.broker_restarts = [*recent, now]
        try:
            started = broker.start()
        except TransientError as exc:
            log.error("the embedded redis-server did not restart: %s; trying again", exc)
            return
        if not started:
            log.error(
                "another redis-server answers on %s; using it, but it is not supervised",
                broker.socket_path,
            )
            broker.process = None
            return
        pid = broker.process.pid if broker.process is not None else None
        log.warning("the embedded redis-server is back (pid %s); workers reconnect to it", pid)

    def _restart_child(self, child: Child) -> None:
        now = time.monotonic()
        recent = [t for t in child.restarts if now - t < RESTART_WINDOW_S]
        if len(recent) >= RESTART_LIMIT:
            log.error(
                "%s exited (code %s) %d times within %.0f s; not restarting it. See %s",
                child.name, child.process.returncode, len(recent),
                RESTART_WINDOW_S, child.log_path,
            )  # fmt: skip
            child.given_up = True
            return
        log.warning(
            "%s exited with code %s; restarting it (see %s)",
            child.name, child.process.returncode, child.log_path,
        )  # fmt: skip
        _signal_group(child.process, signal.SIGKILL)  # its pool children too
        self._mark_metrics_dead(child)
        self.children.remove(child)
        self._spawn(child.name, child.command, child.extra_env)
        self.children[-1].restarts = [*recent, now]

    def _mark_metrics_dead(self, child: Child) -> None:
        if self.metrics_dir is not None:
            from imgpipe.face.metrics_server import mark_dead

            mark_dead(child.process.pid, self.metrics_dir)

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
        if role == "api":
            return [*base, "serve"]
        raise ValueError(f"unknown worker role {role!r}")

    def _spawn(
        self, name: str, command: list[str], extra_env: dict[str, str] | None = None
    ) -> None:
        log_path = self.log_dir / f"{name}.log"
        env = child_env(self.settings, extra_env)
        if self.metrics_dir is not None:
            env[MULTIPROC_ENV] = str(self.metrics_dir)
        # A stop signal between starting the child and recording it would orphan it.
        with signals_deferred(), log_path.open("ab") as log_file:
            process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
            self.children.append(Child(name, process, log_path, command, dict(extra_env or {})))

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
                        f"{len(replies)} of {expected} workers answered within {timeout_s:.0f} s "
                        f"on {redact_url(self.settings.effective_broker_url)}; "
                        f"see the logs in {self.log_dir}"
                    )
        finally:
            app.close()

    def stop(self) -> None:
        """Stop every child in STOP_ORDER, then the embedded broker; nothing is left."""
        with signals_deferred():
            self._stopping.set()
            if self._supervisor is not None:
                self._supervisor.join(timeout=5)
                self._supervisor = None
            for step in range(len(STOP_ORDER)):
                self._stop_children([c for c in self.children if _stop_step(c.name) == step])
            self.children.clear()
            if self.broker is not None:
                self.broker.stop()
                self.broker = None
            if self._metrics is not None:
                self._metrics.close()
                self._metrics = None

    def _stop_children(self, children: list[Child]) -> None:
        if not children:
            return
        log.info("stopping %s", ", ".join(c.name for c in children))
        for child in children:
            # The main process only: a warm shutdown lets the batch or task in hand
            # finish (a SIGTERM to the whole group killed pool children mid-stage).
            if child.process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    child.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.effective_stop_timeout_s
        for child in children:
            remaining = max(0.1, deadline - time.monotonic())
            try:
                child.process.wait(remaining)
            except subprocess.TimeoutExpired:
                log.warning(
                    "%s did not stop within %.0f s; killing it (see %s)",
                    child.name, self.effective_stop_timeout_s, child.log_path,
                )  # fmt: skip
        for child in children:
            # Pool children of a worker that exited can outlive it: kill the whole group.
            _signal_group(child.process, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.process.wait(5)

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
