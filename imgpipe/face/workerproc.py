"""Starting the worker processes of each role (called by the CLI in this process).

- ``orchestrator``: the control queues, with the embedded beat scheduler for the reaper.
- ``cpu``: quality and enhance, ``cpu_concurrency`` batching consumer processes
  (workers/pool.py): one claim and one persist transaction per batch of messages.
- ``gpu``: model stages, one micro-batching consumer process per device
  (workers/batching.py): many messages, one forward pass, acks after commit.
Queue order is ``interactive`` then ``.bulk`` with the ``priority`` strategy.

Logs: structured (imgpipe/logs.py, ``IMGPIPE_LOG_FORMAT``), each line naming its worker.
Metrics: with ``IMGPIPE_METRICS_PORT`` set (and not 0), the worker serves ``/metrics``
for itself and the processes it forks (imgpipe/face/metrics_server.py); under
``imgpipe up`` the stack serves them instead.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from celery import Celery

from imgpipe.celery_app import QUEUES, create_app
from imgpipe.extras import require_model_extra
from imgpipe.logs import configure_logging, resolve_format, set_worker
from imgpipe.settings import Settings

__all__ = ["run_worker"]

ROLE_MODULES = {
    "orchestrator": ["orchestrator.tasks"],
    "cpu": [],
    "gpu": [],
}


def run_worker(
    settings: Settings,
    role: str,
    *,
    device: str = "cpu",
    queues: Sequence[str] | None = None,
    concurrency: int | None = None,
    loglevel: str = "INFO",
) -> None:
    if role not in ROLE_MODULES:
        raise ValueError(f"unknown worker role {role!r}; choose orchestrator, cpu or gpu")
    if role == "gpu":
        require_model_extra(f"the model worker (imgpipe worker gpu --device {device})")
    settings.resolved_data_dir.mkdir(parents=True, exist_ok=True)
    configure_logging(settings.log_format, loglevel, worker=f"{role}-{os.getpid()}")
    metrics_dir = _serve_metrics(settings, role) or _recording_dir()
    app = create_app(settings, include=ROLE_MODULES[role])
    role_queues = (
        list(queues) if queues else list(QUEUES["control" if role == "orchestrator" else role])
    )
    if role == "gpu":
        run_model_worker(settings, app, device, role_queues)
        return
    if role == "cpu":
        run_cpu_worker(settings, role_queues, concurrency or settings.cpu_concurrency, metrics_dir)
        return
    if concurrency is None:
        concurrency = settings.cpu_concurrency if role == "cpu" else 2
    node = f"{role}-{device.replace(':', '')}-{os.getpid()}@{socket.gethostname()}"
    argv = [
        "worker",
        "--queues", ",".join(role_queues),
        "--concurrency", str(concurrency),
        "--pool", "prefork",
        "--hostname", node,
        "--loglevel", loglevel,
        "--without-gossip",
        "--without-mingle",
    ]  # fmt: skip
    set_worker(node)
    if _connect_celery_logging(settings, loglevel, metrics_dir) == "json":
        argv.insert(0, "--quiet")  # no ASCII-art banner among the JSON lines
    if role == "orchestrator":
        argv.append("--beat")
        argv += ["--schedule", str(settings.resolved_data_dir / "celerybeat-schedule")]
    app.worker_main(argv)


def _serve_metrics(settings: Settings, role: str) -> Path | None:
    """Serve /metrics when IMGPIPE_METRICS_PORT is set (not 0): this process and those it
    forks record into the worker's multi-process directory; the orchestrator adds the
    stack's SQL/Redis state. Returns the directory (None: not serving)."""
    if not settings.metrics_port:
        return None
    from imgpipe.face.metrics_dirs import standalone_multiproc_dir

    metrics_dir = standalone_multiproc_dir(settings, role)  # before prometheus_client loads
    from imgpipe.face.metrics_server import serve_metrics

    server = serve_metrics(
        settings, settings.metrics_port, metrics_dir, with_state=role == "orchestrator"
    )
    import logging

    logging.getLogger(__name__).info(
        "metrics on http://%s:%d/metrics", settings.metrics_address, server.port
    )
    return metrics_dir


def _recording_dir() -> Path | None:
    """Under ``imgpipe up`` the stack serves; this worker only records (and drops the live
    gauges of the processes it forked when they exit)."""
    from imgpipe.face.metrics_dirs import MULTIPROC_ENV

    given = os.environ.get(MULTIPROC_ENV)
    return Path(given) if given else None


def _connect_celery_logging(settings: Settings, loglevel: str, metrics_dir: Path | None) -> str:
    """Celery worker (the orchestrator): keep imgpipe's log configuration (returns the
    format), name the task on every line logged inside it, and drop the live gauges of
    pool processes that exit."""
    from celery import signals

    from imgpipe.logs import bound

    def keep_logging(**_kw: Any) -> None:
        configure_logging(settings.log_format, loglevel)

    contexts: dict[str, Any] = {}

    def task_started(task_id: str, task: Any, args: Any = (), **_kw: Any) -> None:
        fields: dict[str, Any] = {"task_id": task_id, "task": task.name}
        if task.name == "imgpipe.advance" and args:
            fields["job_id"] = str(args[0])
        context = bound(**fields)
        context.__enter__()
        contexts[task_id] = context

    def task_finished(task_id: str, **_kw: Any) -> None:
        context = contexts.pop(task_id, None)
        if context is not None:
            context.__exit__(None, None, None)

    def process_exited(pid: int, **_kw: Any) -> None:
        if metrics_dir is not None:
            from imgpipe.face.metrics_server import mark_dead

            mark_dead(pid, metrics_dir)

    signals.setup_logging.connect(keep_logging, weak=False)
    signals.task_prerun.connect(task_started, weak=False)
    signals.task_postrun.connect(task_finished, weak=False)
    signals.worker_process_shutdown.connect(process_exited, weak=False)
    return resolve_format(settings.log_format, sys.stderr)


def run_cpu_worker(
    settings: Settings, queues: Sequence[str], processes: int, metrics_dir: Path | None = None
) -> None:
    """``processes`` batching consumers (quality, enhance) under one supervising parent."""
    from workers.pool import run_pool

    base = f"cpu-{os.getpid()}"

    def consume(index: int) -> None:
        from workers.batching import BatchingConsumer
        from workers.process import make_executor

        hostname = f"{base}-{index}@{socket.gethostname()}"
        set_worker(hostname)
        app = create_app(settings, include=ROLE_MODULES["cpu"])
        consumer = BatchingConsumer(
            app,
            make_executor(app, None),
            queues,
            batch_size=settings.cpu_batch_size,
            batch_wait_ms=settings.cpu_batch_wait_ms,
            hostname=hostname,
        )
        consumer.install_signal_handlers()
        consumer.run()

    def exited(pid: int) -> None:
        if metrics_dir is not None:
            from imgpipe.face.metrics_server import mark_dead

            mark_dead(pid, metrics_dir)

    from imgpipe.face.stack import warm_stop_timeout_s

    run_pool(processes, consume, warm_stop_timeout_s(settings), on_exit=exited)


def run_model_worker(settings: Settings, app: Celery, device: str, queues: Sequence[str]) -> None:
    """The model worker for ``device``: the micro-batching consumer in this process."""
    from workers.batching import BatchingConsumer
    from workers.process import make_executor

    hostname = f"gpu-{device.replace(':', '')}-{os.getpid()}@{socket.gethostname()}"
    set_worker(hostname)
    executor = make_executor(app, device)
    consumer = BatchingConsumer(
        app,
        executor,
        queues,
        batch_size=settings.batch_size_for(device),
        batch_wait_ms=settings.batch_wait_ms_for(device),
        hostname=hostname,
    )
    consumer.install_signal_handlers()
    consumer.run()
