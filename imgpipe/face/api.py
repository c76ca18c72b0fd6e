"""The Python API: ``imgpipe.submit``, ``imgpipe.wait`` and ``imgpipe.results``.

Needs a broker the workers read (``imgpipe up`` running, or IMGPIPE_BROKER_URL) and the
same database; ``imgpipe run`` does all of it for a one-off batch.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from imgpipe.contracts import Priority
from imgpipe.errors import PermanentError
from imgpipe.settings import Settings

__all__ = ["results", "submit", "wait"]

_contexts: dict[int, Any] = {}


def _context(settings: Settings | None) -> Any:
    from orchestrator.context import OrchestratorContext

    settings = settings or Settings()
    key = id(settings)
    if key not in _contexts:
        _contexts[key] = OrchestratorContext(settings)
    return _contexts[key]


def submit(
    image: str | Path | bytes,
    pipeline: str | None = None,
    *,
    priority: Priority | str = Priority.INTERACTIVE,
    idempotency_key: str | None = None,
    reply_to: str | None = None,
    metadata: Mapping[str, Any] | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    force: bool = False,
    settings: Settings | None = None,
) -> Any:
    """Submit one image (a path or its bytes); returns a ``SubmitResult``.

    The fields are checked by the same parser as the submit stream and the Celery task
    (orchestrator/submit_fields.py): a bad one raises ``PermanentError`` saying which."""
    from orchestrator.submit import submit as submit_request
    from orchestrator.submit_fields import SubmitFields, build_request

    ctx = _context(settings)
    if isinstance(image, bytes):
        data = image
    else:
        try:
            data = Path(image).read_bytes()
        except OSError as exc:
            raise PermanentError(f"cannot read image file {image}: {exc.strerror}") from exc
    fields = SubmitFields(
        data=data,
        pipeline=pipeline,
        idempotency_key=idempotency_key,
        priority=str(priority),
        reply_to=reply_to,
        metadata=metadata,
        overrides=overrides,
        force=force,
    )
    return submit_request(ctx, build_request(ctx, fields, source="api"))


def results(job_id: str, settings: Settings | None = None) -> dict[str, Any] | None:
    """The job with every stage's outcome, provenance and timings, or None if unknown."""
    from db.engine import session_scope
    from orchestrator.reports import job_report

    ctx = _context(settings)
    with session_scope(ctx.database_url) as session:
        return job_report(session, job_id)


def wait(
    job_ids: list[str], timeout_s: float = 600.0, settings: Settings | None = None
) -> dict[str, str]:
    """Poll until every job is terminal (or the timeout); returns job id -> status."""
    from orchestrator.reports import wait_terminal

    return wait_terminal(_context(settings).database_url, job_ids, timeout_s)
