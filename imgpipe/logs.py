"""Structured logs (structlog over the standard ``logging`` module).

Every imgpipe module logs through ``logging.getLogger(__name__)`` as before; this module
routes those records (and Celery's, kombu's, ...) through structlog's processors:

- ``json``: one JSON object per line with ``timestamp`` (UTC, ISO 8601), ``level``,
  ``logger``, ``event`` (the message), ``worker`` (the process's worker name), and the
  fields bound around the work in hand: ``job_id``, ``stage``, ``attempt``,
  ``stage_run_id`` while a stage is handled (``job_ids`` ... for a batch of several),
  ``task_id``/``task`` inside a Celery task. For log search.
- ``console``: the same fields, human-readable (colours on a terminal).

``IMGPIPE_LOG_FORMAT=json|console|auto`` (auto: console when stderr is a terminal, json
otherwise: the log files of ``imgpipe up`` and a container's output are JSON).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator, MutableMapping, Sequence
from contextlib import contextmanager
from typing import Any, TextIO

import structlog
from structlog.contextvars import bind_contextvars, reset_contextvars
from structlog.typing import EventDict, WrappedLogger

__all__ = ["StageRef", "bound", "bound_stages", "configure_logging", "resolve_format", "set_worker"]

_static: dict[str, Any] = {}
"""Fields of this process added to every line (``worker``), whatever the thread."""

StageRef = tuple[str, str, int, int]
"""(job_id, stage, attempt, stage_run_id) of a stage run being handled."""


def set_worker(name: str) -> None:
    """Name this process in every line it logs (``worker`` field)."""
    _static["worker"] = name


def _add_static(_logger: WrappedLogger, _name: str, event: EventDict) -> EventDict:
    for key, value in _static.items():
        event.setdefault(key, value)
    return event


def resolve_format(fmt: str, stream: TextIO) -> str:
    """``auto`` becomes ``console`` on a terminal, ``json`` elsewhere."""
    if fmt == "auto":
        return "console" if stream.isatty() else "json"
    if fmt not in ("json", "console"):
        raise ValueError(f"log format {fmt!r}: use json, console or auto (IMGPIPE_LOG_FORMAT)")
    return fmt


def configure_logging(
    fmt: str = "auto", level: str | int = "INFO", worker: str | None = None
) -> str:
    """Send every log record of this process to stderr in ``fmt``; returns the format used."""
    stream = sys.stderr
    resolved = resolve_format(fmt, stream)
    if worker is not None:
        set_worker(worker)
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        _add_static,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: Any
    if resolved == "json":
        shared.append(structlog.processors.format_exc_info)
        renderer = structlog.processors.JSONRenderer(default=str)
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=stream.isatty())
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    logging.captureWarnings(True)  # warnings become log lines too (``py.warnings``)
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    return resolved


@contextmanager
def bound(**fields: Any) -> Iterator[None]:
    """Add ``fields`` to every line logged in this context (this thread or task)."""
    tokens = bind_contextvars(**fields)
    try:
        yield
    finally:
        reset_contextvars(**tokens)


def bound_stages(stages: Sequence[StageRef]) -> Any:
    """Context for handling ``stages``: one stage binds ``job_id``, ``stage``, ``attempt``
    and ``stage_run_id``; several bind the same as lists (``job_ids``, ``stages`` ...)
    so that a field keeps one type in a log index."""
    if len(stages) == 1:
        job_id, stage, attempt, stage_run_id = stages[0]
        return bound(job_id=job_id, stage=stage, attempt=attempt, stage_run_id=stage_run_id)
    fields: MutableMapping[str, Any] = {
        "job_ids": [s[0] for s in stages],
        "stages": sorted({s[1] for s in stages}),
        "stage_run_ids": [s[3] for s in stages],
    }
    return bound(**fields)
