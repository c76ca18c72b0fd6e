"""Dead letters reference blobs instead of carrying image bytes (Redis runs noeviction).

When the submit consumer dead-letters an entry (orchestrator/ingest.py), its ``image``
bytes are parked in the blob store under their sha256 (``db.blobs.parked_blob_key``) and
the copy on ``imgpipe:submit:dead`` gets ``image_ref = sha256:<hex>`` instead, plus
``_dead_image_bytes``. Re-adding the dead letter's fields (without the ``_dead_*`` ones)
to ``imgpipe:submit`` submits the same image: ``image_ref`` ``sha256:`` resolves to the
parked blob when no images row has it (orchestrator/ingest_entry.py). ``imgpipe gc``
keeps every blob a dead letter still names (``dead_letter_refs``).

If the blob store cannot take the bytes (it may be the very failure that dead-lettered
the entry), the dead letter keeps them inline, as before, and says so in the log.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any

import redis

from db.blobs import BlobStore, parked_blob_key
from imgpipe.contracts import SUBMIT_DEAD_STREAM
from imgpipe.errors import TransientError

__all__ = ["dead_letter_fields", "dead_letter_refs"]

log = logging.getLogger(__name__)

_SHA256_REF = re.compile(rb"^sha256:([0-9a-f]{64})$")
SCAN_BATCH = 1000


def dead_letter_fields(
    blobs: BlobStore, entry_id: str, fields: Mapping[bytes, bytes]
) -> dict[bytes, bytes]:
    """The entry's fields for the dead-letter stream: ``image`` parked in the blob store."""
    dead = dict(fields)
    image = dead.get(b"image")
    if image is None or b"image_ref" in dead:
        return dead
    try:
        key = blobs.put(image, "application/octet-stream")
    except TransientError as exc:
        log.warning("dead letter %s keeps its %d image bytes inline: %s", entry_id, len(image), exc)
        return dead
    del dead[b"image"]
    dead[b"image_ref"] = f"sha256:{key.rsplit('/', 1)[-1]}".encode()
    dead[b"_dead_image_bytes"] = str(len(image)).encode()
    return dead


def dead_letter_refs(client: redis.Redis) -> set[str]:
    """Blob keys the dead letters on ``imgpipe:submit:dead`` park their images under."""
    keys: set[str] = set()
    start = "-"
    while True:
        entries: list[Any] = list(
            client.xrange(SUBMIT_DEAD_STREAM, start, "+", count=SCAN_BATCH) or []
        )
        for _entry_id, fields in entries:
            ref = (fields or {}).get(b"image_ref", b"")
            match = _SHA256_REF.match(ref if isinstance(ref, bytes) else ref.encode())
            if match is not None:
                keys.add(parked_blob_key(match.group(1).decode()))
        if len(entries) < SCAN_BATCH:
            return keys
        last = entries[-1][0]
        start = "(" + (last.decode() if isinstance(last, bytes) else str(last))
