"""POST /v1/jobs bodies -> the submit-stream contract's fields -> a SubmitRequest.

Both bodies carry the stream contract's fields (docs/submitting.md) and are validated by
the same code as a stream entry (``orchestrator.ingest_entry.parse_entry``): the same
names, limits and reason codes. The idempotency key comes from the ``Idempotency-Key``
header. ``multipart/form-data`` carries the image bytes in the ``image`` part;
``application/json`` carries ``image_ref`` (``sha256:<hex>`` of a stored image, or a path
under IMGPIPE_INGEST_ROOT), with ``metadata`` and ``overrides`` as objects.
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from typing import Any

from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import Request

from imgpipe.face.web.errors import ApiError
from orchestrator.context import OrchestratorContext
from orchestrator.ingest_entry import ENTRY_KEY_PREFIX, parse_entry
from orchestrator.submit import SubmitRequest

__all__ = ["BODY_FIELDS", "OPENAPI_REQUEST_BODY", "read_fields", "to_request"]

BODY_FIELDS = ("image", "image_ref", "pipeline", "priority", "reply_to", "metadata", "overrides",
               "force")  # fmt: skip
SOURCE = "http"
MAX_FORM_FIELDS = len(BODY_FIELDS)
MAX_TEXT_PART_BYTES = 64 * 1024

_TEXT = {"type": "string", "maxLength": 1000}
OPENAPI_REQUEST_BODY: dict[str, Any] = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["image"],
                "properties": {
                    "image": {"type": "string", "format": "binary"},
                    "pipeline": _TEXT,
                    "priority": {"type": "string", "enum": ["interactive", "bulk"]},
                    "reply_to": _TEXT,
                    "metadata": {"type": "string", "description": "A JSON object."},
                    "overrides": {"type": "string", "description": "A JSON object."},
                    "force": {"type": "string", "enum": ["0", "1", "true", "false"]},
                },
                "additionalProperties": False,
            }
        },
        "application/json": {
            "schema": {
                "type": "object",
                "required": ["image_ref"],
                "properties": {
                    "image_ref": _TEXT,
                    "pipeline": _TEXT,
                    "priority": {"type": "string", "enum": ["interactive", "bulk"]},
                    "reply_to": _TEXT,
                    "metadata": {"type": "object"},
                    "overrides": {"type": "object"},
                    "force": {"type": "boolean"},
                },
                "additionalProperties": False,
            }
        },
    },
}


def _bad(message: str, code: str = "bad_field") -> ApiError:
    return ApiError(400, code, message)


def _text_field(name: str, value: Any) -> bytes:
    if not isinstance(value, str):
        raise _bad(f"{name} must be a string, not {type(value).__name__}")
    if "\x00" in value:
        raise _bad(f"{name} contains a NUL character; send plain text")
    return value.encode("utf-8")


async def _form_fields(request: Request) -> dict[bytes, bytes]:
    try:
        form = await request.form(
            max_files=1, max_fields=MAX_FORM_FIELDS, max_part_size=MAX_TEXT_PART_BYTES
        )
    except (HTTPException, MultiPartException) as exc:
        detail = getattr(exc, "detail", None) or getattr(exc, "message", None) or exc
        raise _bad(f"the multipart body cannot be parsed: {detail}", "bad_body") from None
    fields: dict[bytes, bytes] = {}
    try:
        for name, value in form.multi_items():
            if name.encode() in fields:
                raise _bad(f"field {name!r} is given twice; send it once")
            if isinstance(value, UploadFile):
                fields[name.encode()] = await value.read()
            elif name == "image":
                fields[b"image"] = value.encode("utf-8")
            else:
                fields[name.encode()] = _text_field(name, value)
    finally:
        await form.close()
    return fields


async def _json_fields(request: Request) -> dict[bytes, bytes]:
    try:
        body = json.loads(await request.body())
    except (UnicodeDecodeError, ValueError) as exc:
        raise _bad(f"the body is not valid JSON: {exc}", "bad_json") from None
    if not isinstance(body, dict):
        raise _bad(f"the body must be a JSON object, not {type(body).__name__}", "bad_json")
    if "image" in body:
        raise _bad(
            "a JSON body names an image with image_ref; upload the bytes as "
            "multipart/form-data (curl -F image=@photo.jpg)"
        )
    fields: dict[bytes, bytes] = {}
    for name, value in body.items():
        if name in ("metadata", "overrides"):
            if not isinstance(value, dict):
                raise _bad(f"{name} must be a JSON object, not {type(value).__name__}", "bad_json")
            fields[name.encode()] = json.dumps(value).encode()
        elif name == "force":
            if not isinstance(value, bool):
                raise _bad(f"force must be true or false, not {value!r}")
            fields[b"force"] = b"1" if value else b"0"
        else:
            fields[str(name).encode()] = _text_field(str(name), value)
    return fields


async def read_fields(request: Request, idempotency_key: str | None) -> dict[bytes, bytes]:
    """The body's fields as a stream entry's, with the idempotency key from the header."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        fields = await _form_fields(request)
    elif content_type == "application/json":
        fields = await _json_fields(request)
    else:
        raise ApiError(
            415,
            "unsupported_media_type",
            f"Content-Type {content_type or '(none)'!r} is not accepted; send "
            "multipart/form-data with the image in the `image` part, or application/json "
            "with `image_ref`",
        )
    if b"idempotency_key" in fields:
        raise _bad("send the idempotency key in the Idempotency-Key header, not in the body")
    if idempotency_key is not None:
        fields[b"idempotency_key"] = _text_field("Idempotency-Key", idempotency_key)
    return fields


def to_request(ctx: OrchestratorContext, fields: dict[bytes, bytes]) -> SubmitRequest:
    """Validate ``fields`` as the stream consumer does (raises ``EntryRejectedError`` with
    the stream's reason code), then make it an HTTP submission: source ``http``, and no
    key unless the client sent one."""
    entry_id = f"http-{uuid.uuid4()}"
    parsed = parse_entry(ctx, entry_id, fields)
    key = parsed.idempotency_key
    if key is not None and key.startswith(ENTRY_KEY_PREFIX) and b"idempotency_key" not in fields:
        key = None
    metadata = {
        k: v
        for k, v in (parsed.metadata or {}).items()
        if not (k == "stream_entry_id" and v == entry_id)  # the stream's, not the client's
    }
    return dataclasses.replace(parsed, idempotency_key=key, source=SOURCE, metadata=metadata)
