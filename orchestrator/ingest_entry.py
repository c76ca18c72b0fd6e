"""One submit-stream entry -> a ``SubmitRequest``, or ``EntryRejectedError`` saying why.

The field contract (docs/submitting.md): ``image`` (raw bytes) or ``image_ref`` (a path
inside IMGPIPE_INGEST_ROOT, or ``sha256:<hex>`` of an image imgpipe already stored),
``pipeline``, ``idempotency_key``, ``priority``, ``reply_to``, ``metadata``,
``overrides``, ``force``. Anything else, or a value that does not parse, is rejected with a
reason code and a message that says what to send instead.
"""

from __future__ import annotations

import dataclasses
import os
import re
import stat
from collections.abc import Mapping
from pathlib import Path

from db.blobs import parked_blob_key
from db.engine import session_scope
from db.models import Image
from imgpipe.contracts import REPLY_PREFIX
from orchestrator.context import OrchestratorContext
from orchestrator.submit import SubmitRequest
from orchestrator.submit_fields import (
    RequestRejectedError,
    SubmitFields,
    build_request,
    check_key,
    check_reply_to,
    rejection_code,
)

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
_SHA256_REF = re.compile(r"^sha256:([0-9a-f]{64})$")
_TRUE = {"1", "true", "yes"}
_FALSE = {"", "0", "false", "no"}

EntryRejectedError = RequestRejectedError
"""A malformed entry (the name the stream consumer has always used)."""


def _decode(name: str, raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise EntryRejectedError(
            "bad_field", f"field {name!r} is not UTF-8 text; send it as UTF-8"
        ) from None


def _text(fields: Mapping[bytes, bytes], name: str) -> str | None:
    raw = fields.get(name.encode())
    return None if raw is None else _decode(name, raw)


def routing_of(
    fields: Mapping[bytes, bytes], prefix: str = REPLY_PREFIX
) -> tuple[str | None, str | None]:
    """The entry's idempotency_key and reply_to where readable: a rejection still reaches
    the submitter when another field is what was wrong."""
    try:
        key = check_key(_text(fields, "idempotency_key"))
    except EntryRejectedError:
        key = None
    try:
        reply_to = check_reply_to(_text(fields, "reply_to"), prefix)
    except EntryRejectedError:
        reply_to = None
    return key, reply_to


def read_image_ref(ctx: OrchestratorContext, ref: str) -> bytes:
    """The bytes ``image_ref`` names; only inside IMGPIPE_INGEST_ROOT or the blob store."""
    sha = _SHA256_REF.match(ref)
    if sha is not None:
        with session_scope(ctx.database_url) as session:
            image = session.get(Image, sha.group(1))
            blob_key = image.blob_key if image is not None else None
        if blob_key is None:
            blob_key = parked_blob_key(sha.group(1))  # a dead letter's bytes (ingest.py)
            if not ctx.blobs.exists(blob_key):
                blob_key = None
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
    """Validate every field of one entry (orchestrator/submit_fields.py, as every entry
    point does); image_ref is read here (bytes never leave)."""
    names = {k.decode("utf-8", "replace"): k for k in fields}
    unknown = sorted(set(names) - set(FIELDS))
    if unknown:
        raise EntryRejectedError(
            "unknown_field",
            f"unknown field(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(FIELDS)}",
        )
    image, image_ref = fields.get(b"image"), fields.get(b"image_ref")
    if (image is None) == (image_ref is None):
        raise EntryRejectedError(
            "missing_image" if image is None else "ambiguous_image",
            "send exactly one of `image` (the raw bytes) and `image_ref` (a path under the "
            "ingest root, or sha256:<hex>)",
        )
    raw_force = (_text(fields, "force") or "").strip().lower()
    if raw_force not in _TRUE | _FALSE:
        raise EntryRejectedError(
            "bad_field", f"force {raw_force!r} must be one of 1, 0, true, false"
        )
    submitted = SubmitFields(
        data=b"",
        pipeline=_text(fields, "pipeline"),
        idempotency_key=_text(fields, "idempotency_key"),
        priority=_text(fields, "priority"),
        reply_to=_text(fields, "reply_to"),
        metadata=fields.get(b"metadata"),
        overrides=fields.get(b"overrides"),
        force=raw_force in _TRUE,
    )
    request = build_request(
        ctx,
        submitted,
        source="stream",
        default_key=f"{ENTRY_KEY_PREFIX}{entry_id}",
        extra_metadata={"stream_entry_id": entry_id},
    )
    data = (
        image if image is not None else read_image_ref(ctx, _decode("image_ref", image_ref or b""))
    )
    return dataclasses.replace(request, data=data)
