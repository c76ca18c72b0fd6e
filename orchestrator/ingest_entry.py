"""One submit-stream entry -> a ``SubmitRequest``, or ``EntryRejectedError`` saying why.

The field contract (docs/submitting.md): ``image`` (raw bytes) or ``image_ref`` (a path
inside IMGPIPE_INGEST_ROOT, or ``sha256:<hex>`` of an image imgpipe already stored),
``pipeline``, ``idempotency_key``, ``priority``, ``reply_to``, ``metadata``,
``overrides``, ``force``. Anything else, or a value that does not parse, is rejected with a
reason code and a message that says what to send instead.
"""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from db.engine import session_scope
from db.models import Image
from imgpipe.contracts import REPLY_PREFIX, Priority, reply_to_problem
from imgpipe.errors import (
    ImgpipeError,
    PermanentError,
    PipelineSpecError,
    StageNotInstalledError,
    UnknownPipelineError,
)
from orchestrator.context import OrchestratorContext
from orchestrator.pipelines import pipeline_names
from orchestrator.submit import SubmitRequest

__all__ = [
    "ENTRY_KEY_PREFIX",
    "FIELDS",
    "EntryRejectedError",
    "parse_entry",
    "read_image_ref",
    "rejection_code",
    "routing_of",
]

FIELDS = (
    "image",
    "image_ref",
    "pipeline",
    "idempotency_key",
    "priority",
    "reply_to",
    "metadata",
    "overrides",
    "force",
)
ENTRY_KEY_PREFIX = "stream:"
"""Entries without an idempotency_key get ``stream:<entry id>``: redelivery finds the job."""
MAX_KEY_CHARS = 200
MAX_PIPELINE_CHARS = 64
_SHA256_REF = re.compile(r"^sha256:([0-9a-f]{64})$")
_TRUE = {"1", "true", "yes"}
_FALSE = {"", "0", "false", "no"}


class EntryRejectedError(PermanentError):
    """A malformed entry; ``code`` is the ``reason`` of its ``rejected`` event."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def _decode(name: str, raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise EntryRejectedError(
            "bad_field", f"field {name!r} is not UTF-8 text; send it as UTF-8"
        ) from None


def rejection_code(exc: ImgpipeError) -> str:
    """The ``reason`` of the rejected event for an entry that raised ``exc``."""
    if isinstance(exc, EntryRejectedError):
        return exc.code
    if isinstance(exc, UnknownPipelineError):
        return "unknown_pipeline"
    if isinstance(exc, StageNotInstalledError):
        return "stage_not_installed"
    if isinstance(exc, PipelineSpecError):
        return "invalid_pipeline"
    return "bad_request"


def routing_of(
    fields: Mapping[bytes, bytes], prefix: str = REPLY_PREFIX
) -> tuple[str | None, str | None]:
    """The entry's idempotency_key and reply_to where readable: a rejection still reaches
    the submitter when another field is what was wrong."""
    try:
        key = _key(fields.get(b"idempotency_key"))
    except EntryRejectedError:
        key = None
    try:
        reply_to = _reply_to(fields.get(b"reply_to"), prefix)
    except EntryRejectedError:
        reply_to = None
    return key, reply_to


def _key(raw: bytes | None) -> str | None:
    if raw is None:
        return None
    key = _decode("idempotency_key", raw)
    if not key or len(key) > MAX_KEY_CHARS:
        raise EntryRejectedError(
            "bad_field", f"idempotency_key must be 1 to {MAX_KEY_CHARS} characters"
        )
    if key.startswith(ENTRY_KEY_PREFIX):
        raise EntryRejectedError(
            "bad_field",
            f"idempotency_key may not start with {ENTRY_KEY_PREFIX!r}: imgpipe uses that prefix "
            "for entries sent without a key; choose another key",
        )
    return key


def _reply_to(raw: bytes | None, prefix: str) -> str | None:
    if raw is None:
        return None
    name = _decode("reply_to", raw)
    problem = reply_to_problem(name, prefix)
    if problem is not None:
        raise EntryRejectedError("bad_field", problem)
    return name


def _json_object(ctx: OrchestratorContext, name: str, raw: bytes | None) -> dict[str, Any] | None:
    if raw is None:
        return None
    limit = ctx.settings.metadata_max_bytes
    if len(raw) > limit:
        raise EntryRejectedError(
            f"{name}_too_large",
            f"{name} is {len(raw)} bytes; the limit is {limit} (IMGPIPE_METADATA_MAX_BYTES). "
            "Keep large data in your own store and send its id",
        )
    try:
        value = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise EntryRejectedError("bad_json", f"{name} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise EntryRejectedError(
            "bad_json", f"{name} must be a JSON object, not {type(value).__name__}"
        )
    return value


def _overrides(
    ctx: OrchestratorContext, raw: bytes | None
) -> Mapping[str, Mapping[str, Any]] | None:
    value = _json_object(ctx, "overrides", raw)
    if value is None:
        return None
    for stage, params in value.items():
        if not isinstance(params, dict):
            raise EntryRejectedError(
                "bad_field",
                f"overrides.{stage} must be an object of parameters, e.g. "
                '{"quality": {"min_score": 30}}',
            )
    return value


def read_image_ref(ctx: OrchestratorContext, ref: str) -> bytes:
    """The bytes ``image_ref`` names; only inside IMGPIPE_INGEST_ROOT or the blob store."""
    sha = _SHA256_REF.match(ref)
    if sha is not None:
        with session_scope(ctx.database_url) as session:
            image = session.get(Image, sha.group(1))
            blob_key = image.blob_key if image is not None else None
        if blob_key is None:
            raise EntryRejectedError(
                "image_ref_not_found",
                f"image_ref {ref!r}: imgpipe has stored no image with that sha256; send the bytes",
            )
        return ctx.blobs.get(blob_key)
    root_setting = ctx.settings.ingest_root
    if root_setting is None:
        raise EntryRejectedError(
            "image_ref_not_allowed",
            "image_ref paths need IMGPIPE_INGEST_ROOT set on the ingest consumer; send the "
            "bytes in `image` instead, or `sha256:<hex>` of an image already stored",
        )
    if "\x00" in ref or not ref:
        raise EntryRejectedError("image_ref_outside_root", "image_ref is empty or has a NUL byte")
    root = root_setting.expanduser().resolve()
    candidate = Path(ref) if os.path.isabs(ref) else root / ref
    outside = EntryRejectedError(
        "image_ref_outside_root",
        f"image_ref {ref!r} resolves outside the ingest root {root} (after following "
        "symlinks); put the file under the root and send its path relative to it",
    )
    try:
        resolved = candidate.resolve(strict=True)
    except (OSError, RuntimeError):
        try:
            inside = candidate.resolve().is_relative_to(root)
        except (OSError, RuntimeError):
            inside = False
        if not inside:
            raise outside from None
        raise EntryRejectedError(
            "image_ref_not_found", f"image_ref {ref!r}: no such file under the ingest root {root}"
        ) from None
    if not resolved.is_relative_to(root):
        raise outside
    return _read_inside(ctx, ref, resolved, root)


def _read_inside(ctx: OrchestratorContext, ref: str, path: Path, root: Path) -> bytes:
    """Open without following a symlink swapped in after the check; re-check via the fd."""
    try:
        fd = os.open(
            path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
        )
    except OSError as exc:
        raise EntryRejectedError(
            "image_ref_not_found", f"image_ref {ref!r} cannot be opened: {exc.strerror}"
        ) from None
    try:
        info = os.fstat(fd)
        proc_link = Path(f"/proc/self/fd/{fd}")
        if proc_link.exists() and not Path(os.readlink(proc_link)).is_relative_to(root):
            raise EntryRejectedError(
                "image_ref_outside_root", f"image_ref {ref!r} changed to point outside the root"
            )
        if not stat.S_ISREG(info.st_mode):
            raise EntryRejectedError(
                "image_ref_not_found", f"image_ref {ref!r} is not a regular file"
            )
        if info.st_size > ctx.settings.max_bytes:
            raise EntryRejectedError(
                "too_many_bytes",
                f"image_ref {ref!r} is {info.st_size} bytes; the limit is "
                f"{ctx.settings.max_bytes} (IMGPIPE_MAX_BYTES)",
            )
        with os.fdopen(os.dup(fd), "rb") as fh:
            return fh.read(ctx.settings.max_bytes + 1)
    finally:
        os.close(fd)


def parse_entry(
    ctx: OrchestratorContext, entry_id: str, fields: Mapping[bytes, bytes]
) -> SubmitRequest:
    """Validate every field of one entry; image_ref is read here (bytes never leave)."""
    names = {k.decode("utf-8", "replace"): k for k in fields}
    unknown = sorted(set(names) - set(FIELDS))
    if unknown:
        raise EntryRejectedError(
            "unknown_field",
            f"unknown field(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(FIELDS)}",
        )

    def get(name: str) -> bytes | None:
        return fields.get(name.encode())

    key = _key(get("idempotency_key"))
    reply_to = _reply_to(get("reply_to"), ctx.settings.reply_to_prefix)
    image, image_ref = get("image"), get("image_ref")
    if (image is None) == (image_ref is None):
        raise EntryRejectedError(
            "missing_image" if image is None else "ambiguous_image",
            "send exactly one of `image` (the raw bytes) and `image_ref` (a path under the "
            "ingest root, or sha256:<hex>)",
        )
    raw_pipeline = get("pipeline")
    pipeline = (
        _decode("pipeline", raw_pipeline)
        if raw_pipeline is not None
        else ctx.settings.default_pipeline
    )
    known = pipeline_names(ctx.settings.pipelines_dir)
    if pipeline not in known:
        raise EntryRejectedError(
            "unknown_pipeline",
            f"unknown pipeline {pipeline[:MAX_PIPELINE_CHARS]!r}; known: {', '.join(known)} "
            "(the operator registers more in IMGPIPE_PIPELINES_DIR; file paths are not "
            "accepted over the stream)",
        )
    raw_priority = _decode("priority", get("priority") or b"interactive")
    try:
        priority = Priority(raw_priority)
    except ValueError:
        raise EntryRejectedError(
            "bad_field", f"priority {raw_priority!r} must be 'interactive' or 'bulk'"
        ) from None
    raw_force = _decode("force", get("force") or b"").strip().lower()
    if raw_force not in _TRUE | _FALSE:
        raise EntryRejectedError(
            "bad_field", f"force {raw_force!r} must be one of 1, 0, true, false"
        )
    metadata = _json_object(ctx, "metadata", get("metadata"))
    overrides = _overrides(ctx, get("overrides"))
    data = (
        image if image is not None else read_image_ref(ctx, _decode("image_ref", image_ref or b""))
    )
    return SubmitRequest(
        data=data,
        pipeline=pipeline,
        priority=priority,
        idempotency_key=key or f"{ENTRY_KEY_PREFIX}{entry_id}",
        source="stream",
        metadata={**(metadata or {}), "stream_entry_id": entry_id},
        overrides=overrides,
        reply_to=reply_to,
        force=raw_force in _TRUE,
    )
