"""The submit consumer's small types (orchestrator/ingest.py): what one poll did, one entry
as read from ``imgpipe:submit``, and the consumer's default name."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Any

__all__ = ["PollReport", "StreamEntry", "as_text", "default_consumer_name"]


def default_consumer_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclass
class PollReport:
    """What one ``poll_once`` did, entry by entry."""

    read: int = 0
    reclaimed: int = 0
    jobs: int = 0
    """Entries that ended as a job (new, a cache hit, or a rejected image)."""
    duplicates: int = 0
    """Of ``jobs``: the idempotency key matched an existing job."""
    rejected: int = 0
    """Malformed entries: a ``rejected`` event, no job."""
    dead: int = 0
    retrying: int = 0
    """Failed transiently; left pending for a later delivery."""
    held: int = 0
    """Failed while the database is unreachable: held by this consumer until it is back."""
    paused: bool = False
    """The database is unreachable: nothing new was read."""


@dataclass(frozen=True)
class StreamEntry:
    """One entry of the submit stream, with how many times it has been delivered."""

    entry_id: str
    fields: dict[bytes, bytes]
    deliveries: int


def as_text(value: Any) -> str:
    """A Redis reply value (bytes or not) as ``str``."""
    return value.decode() if isinstance(value, bytes) else str(value)
