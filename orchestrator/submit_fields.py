"""One validator for the fields of a submission, whatever the entry point.

The submit stream (orchestrator/ingest_entry.py), the Celery task ``imgpipe.submit``
(orchestrator/tasks.py), the Python API and the CLI (imgpipe/face/) each turn what they
received into ``SubmitFields`` and call ``build_request``: the same limits (key lengths,
``reply_to`` namespace, pipeline name, priority, metadata and overrides size and shape)
and the same reason codes and messages everywhere. Overrides are then checked against the
pipeline's allow-list when the spec is resolved (orchestrator/overrides.py).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from imgpipe.contracts import Priority, reply_to_problem
from imgpipe.errors import (
    ImgpipeError,
    OverrideNotAllowedError,
    PermanentError,
    PipelineSpecError,
    StageNotInstalledError,
    UnknownPipelineError,
)
from orchestrator.context import OrchestratorContext
from orchestrator.pipelines import pipeline_names
from orchestrator.submit import SubmitRequest

__all__ = [
    "MAX_KEY_CHARS",
    "MAX_PIPELINE_CHARS",
    "RESERVED_KEY_PREFIXES",
    "RequestRejectedError",
    "SubmitFields",
    "build_request",
    "check_key",
    "check_reply_to",
    "json_object",
    "json_size_bytes",
    "rejection_code",
]

MAX_KEY_CHARS = 200
MAX_PIPELINE_CHARS = 64
RESERVED_KEY_PREFIXES = ("stream:", "celery:")
"""Keys imgpipe gives submissions sent without one (``stream:<entry id>``,
``celery:<task id>``), so that a redelivered submission finds its job."""


class RequestRejectedError(PermanentError):
    """A malformed submission; ``code`` is the ``reason`` of its ``rejected`` event."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def rejection_code(exc: ImgpipeError) -> str:
    """The ``reason`` of the rejected event for a submission that raised ``exc``."""
    if isinstance(exc, RequestRejectedError):
        return exc.code
    if isinstance(exc, UnknownPipelineError):
        return "unknown_pipeline"
    if isinstance(exc, StageNotInstalledError):
        return "stage_not_installed"
    if isinstance(exc, PipelineSpecError):
        return "invalid_pipeline"
    if isinstance(exc, OverrideNotAllowedError):
        return "override_not_allowed"
    return "bad_request"


@dataclass(frozen=True)
class SubmitFields:
    """A submission as its entry point received it, text already decoded."""

    data: bytes
    pipeline: str | None = None
    idempotency_key: str | None = None
    priority: str | None = None
    reply_to: str | None = None
    metadata: str | bytes | Mapping[str, Any] | None = None
    """A JSON object, or its JSON text (the stream's field)."""
    overrides: str | bytes | Mapping[str, Any] | None = None
    force: bool = False


def check_key(key: str | None) -> str | None:
    if key is None:
        return None
    if not isinstance(key, str) or not key or len(key) > MAX_KEY_CHARS:
        raise RequestRejectedError(
            "bad_field", f"idempotency_key must be 1 to {MAX_KEY_CHARS} characters"
        )
    for prefix in RESERVED_KEY_PREFIXES:
        if key.startswith(prefix):
            raise RequestRejectedError(
                "bad_field",
                f"idempotency_key may not start with {prefix!r}: imgpipe uses that prefix for "
                "submissions sent without a key; choose another key",
            )
    return key


def check_reply_to(name: str | None, prefix: str) -> str | None:
    if name is None:
        return None
    if not isinstance(name, str):
        raise RequestRejectedError("bad_field", f"reply_to must be a string, not {name!r}")
    problem = reply_to_problem(name, prefix)
    if problem is not None:
        raise RequestRejectedError("bad_field", problem)
    return name


def json_size_bytes(value: Any) -> int:
    """Bytes of ``value`` as compact JSON (how metadata and overrides are measured when
    they arrive as objects rather than JSON text)."""
    try:
        text = json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise RequestRejectedError("bad_json", f"not representable as JSON: {exc}") from None
    return len(text.encode("utf-8"))


def json_object(
    ctx: OrchestratorContext, name: str, value: str | bytes | Mapping[str, Any] | None
) -> dict[str, Any] | None:
    """``metadata`` or ``overrides`` as JSON text or an object: within the size limit
    (``IMGPIPE_METADATA_MAX_BYTES``, of the JSON text) and a JSON object."""
    if value is None:
        return None
    if isinstance(value, Mapping):
        size = json_size_bytes(value)
        parsed: Any = value
    elif isinstance(value, str | bytes):
        size = len(value.encode("utf-8") if isinstance(value, str) else value)
        parsed = None
    else:
        raise RequestRejectedError(
            "bad_json", f"{name} must be a JSON object, not {type(value).__name__}"
        )
    limit = ctx.settings.metadata_max_bytes
    if size > limit:
        raise RequestRejectedError(
            f"{name}_too_large",
            f"{name} is {size} bytes; the limit is {limit} (IMGPIPE_METADATA_MAX_BYTES). "
            "Keep large data in your own store and send its id",
        )
    if parsed is None:
        try:
            parsed = json.loads(value)  # type: ignore[arg-type]
        except (UnicodeDecodeError, ValueError) as exc:
            raise RequestRejectedError("bad_json", f"{name} is not valid JSON: {exc}") from None
    if not isinstance(parsed, dict):
        raise RequestRejectedError(
            "bad_json", f"{name} must be a JSON object, not {type(parsed).__name__}"
        )
    return parsed


def _check_overrides(value: Mapping[str, Any] | None) -> Mapping[str, Mapping[str, Any]] | None:
    if value is None:
        return None
    for stage, params in value.items():
        if not isinstance(params, Mapping):
            raise RequestRejectedError(
                "bad_field",
                f"overrides.{stage} must be an object of parameters, e.g. "
                '{"quality": {"min_side_px": 30}}',
            )
    return value


def _check_pipeline(ctx: OrchestratorContext, name: str | None, allow_paths: bool) -> str:
    if name is None:
        return ctx.settings.default_pipeline
    if not isinstance(name, str):
        raise RequestRejectedError("bad_field", f"pipeline must be a string, not {name!r}")
    if allow_paths and name.endswith(".toml"):
        return name
    known = pipeline_names(ctx.settings.pipelines_dir)
    if name not in known:
        raise RequestRejectedError(
            "unknown_pipeline",
            f"unknown pipeline {name[:MAX_PIPELINE_CHARS]!r}; known: {', '.join(known)} "
            "(the operator registers more in IMGPIPE_PIPELINES_DIR; file paths are not "
            "accepted from submitters)",
        )
    return name


def _check_priority(value: str | None) -> Priority:
    if value is None:
        return Priority.INTERACTIVE
    try:
        return Priority(value)
    except ValueError:
        raise RequestRejectedError(
            "bad_field", f"priority {value!r} must be 'interactive' or 'bulk'"
        ) from None


def build_request(
    ctx: OrchestratorContext,
    fields: SubmitFields,
    *,
    source: str,
    default_key: str | None = None,
    extra_metadata: Mapping[str, Any] | None = None,
    allow_pipeline_paths: bool = False,
) -> SubmitRequest:
    """Validate ``fields``; a ``RequestRejectedError`` says which field and why.

    ``default_key`` is the key a submission without one gets (``stream:<entry id>``);
    ``allow_pipeline_paths`` only for the operator's own CLI (``imgpipe run``)."""
    key = check_key(fields.idempotency_key)
    reply_to = check_reply_to(fields.reply_to, ctx.settings.reply_to_prefix)
    pipeline = _check_pipeline(ctx, fields.pipeline, allow_pipeline_paths)
    priority = _check_priority(fields.priority)
    metadata = json_object(ctx, "metadata", fields.metadata)
    overrides = _check_overrides(json_object(ctx, "overrides", fields.overrides))
    return SubmitRequest(
        data=fields.data,
        pipeline=pipeline,
        priority=priority,
        idempotency_key=key or default_key,
        source=source,
        metadata={**(metadata or {}), **(extra_metadata or {})},
        overrides=overrides,
        reply_to=reply_to,
        force=fields.force,
    )
