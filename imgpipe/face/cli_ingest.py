"""``imgpipe ingest``: consume the submit stream (submissions from other services)."""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Annotated, Any

import typer

from imgpipe.settings import Settings

__all__ = ["ingest", "register"]


def ingest(
    consumer: Annotated[
        str | None,
        typer.Option(help="Consumer name in the group (default: host-pid; NAME-i with -n)."),
    ] = None,
    consumers: Annotated[
        int,
        typer.Option(
            "--consumers", "-n", min=1, help="Consumer processes in the group (default 1)."
        ),
    ] = 1,
    loglevel: Annotated[str, typer.Option()] = "INFO",
) -> None:
    """Consume the submit stream (imgpipe:submit) in the foreground until SIGTERM/Ctrl-C.

    Run one or more anywhere the database and Redis are reachable (each process is its
    own consumer in the group); --consumers N starts N here and restarts one that
    dies. See docs/submitting.md.
    """
    from imgpipe.logs import configure_logging

    configure_logging(Settings().log_format, loglevel, worker=f"ingest-{os.getpid()}")
    stop = threading.Event()

    def request_stop(signum: int, _frame: Any) -> None:
        logging.getLogger(__name__).info("signal %d: stopping after this batch", signum)
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    if consumers > 1:
        from imgpipe.face.ingest_group import run_consumer_processes

        names = [f"{consumer}-{i}" if consumer else None for i in range(1, consumers + 1)]
        run_consumer_processes(names, loglevel, stop)
        return
    from orchestrator.context import OrchestratorContext
    from orchestrator.ingest import SubmitConsumer

    settings = Settings()
    settings.resolved_data_dir.mkdir(parents=True, exist_ok=True)
    consumer_ = SubmitConsumer(OrchestratorContext(settings), consumer)
    consumer_.run_forever(stop)


def register(app: typer.Typer) -> None:
    """Add ``imgpipe ingest`` to the ``imgpipe`` app."""
    app.command()(ingest)
