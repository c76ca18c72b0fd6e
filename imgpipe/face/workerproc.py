"""Starting the worker processes of each role (called by the CLI in this process).

- ``orchestrator``: the control queues, with the embedded beat scheduler for the reaper.
- ``cpu``: quality and enhance, ``cpu_concurrency`` batching consumer processes
  (workers/pool.py): one claim and one persist transaction per batch of messages.
- ``gpu``: model stages, one micro-batching consumer process per device
  (workers/batching.py): many messages, one forward pass, acks after commit.
Queue order is ``interactive`` then ``.bulk`` with the ``priority`` strategy.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence

from celery import Celery

from imgpipe.celery_app import QUEUES, create_app
from imgpipe.extras import require_model_extra
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
    app = create_app(settings, include=ROLE_MODULES[role])
    role_queues = (
        list(queues) if queues else list(QUEUES["control" if role == "orchestrator" else role])
    )
    if role == "gpu":
        run_model_worker(settings, app, device, role_queues)
        return
    if role == "cpu":
        run_cpu_worker(settings, role_queues, concurrency or settings.cpu_concurrency)
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
    if role == "orchestrator":
        argv.append("--beat")
        argv += ["--schedule", str(settings.resolved_data_dir / "celerybeat-schedule")]
    app.worker_main(argv)


def _log_to_stderr() -> None:
    import logging

    logging.basicConfig(level=logging.INFO, format="[%(asctime)s: %(levelname)s] %(message)s")


def run_cpu_worker(settings: Settings, queues: Sequence[str], processes: int) -> None:
    """``processes`` batching consumers (quality, enhance) under one supervising parent."""
    from workers.pool import run_pool

    _log_to_stderr()
    base = f"cpu-{os.getpid()}"

    def consume(index: int) -> None:
        from workers.batching import BatchingConsumer
        from workers.process import make_executor

        app = create_app(settings, include=ROLE_MODULES["cpu"])
        consumer = BatchingConsumer(
            app,
            make_executor(app, None),
            queues,
            batch_size=settings.cpu_batch_size,
            batch_wait_ms=settings.cpu_batch_wait_ms,
            hostname=f"{base}-{index}@{socket.gethostname()}",
        )
        consumer.install_signal_handlers()
        consumer.run()

    from imgpipe.face.stack import warm_stop_timeout_s

    run_pool(processes, consume, warm_stop_timeout_s(settings))


def run_model_worker(settings: Settings, app: Celery, device: str, queues: Sequence[str]) -> None:
    """The model worker for ``device``: the micro-batching consumer in this process."""
    from workers.batching import BatchingConsumer
    from workers.process import make_executor

    _log_to_stderr()
    executor = make_executor(app, device)
    consumer = BatchingConsumer(
        app,
        executor,
        queues,
        batch_size=settings.batch_size_for(device),
        batch_wait_ms=settings.batch_wait_ms_for(device),
        hostname=f"gpu-{device.replace(':', '')}-{os.getpid()}@{socket.gethostname()}",
    )
    consumer.install_signal_handlers()
    consumer.run()
