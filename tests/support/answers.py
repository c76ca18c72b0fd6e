"""Reading answers on reply streams in tests (a plain Redis client, like any submitter)."""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import func, select

from db.engine import session_scope
from db.models import OutboxRow
from tests.clients.submit_client import SubmitClient

__all__ = ["outbox_rows", "wait_event", "wait_outbox_empty"]


def wait_event(
    client: SubmitClient, stream: str, event: str, key: str, timeout_s: float
) -> dict[str, Any]:
    """The first ``event`` for idempotency key ``key`` on ``stream``; AssertionError after
    ``timeout_s`` naming what the stream holds."""
    deadline = time.monotonic() + timeout_s
    while True:
        seen = [e for _id, e in client.read(stream)]
        for found in seen:
            if found.get("event") == event and found.get("idempotency_key") == key:
                return found
        if time.monotonic() > deadline:
            raise AssertionError(f"no {event} for {key} on {stream} in {timeout_s} s: {seen}")
        time.sleep(0.05)


def outbox_rows(database_url: str) -> int:
    with session_scope(database_url) as session:
        return int(session.execute(select(func.count()).select_from(OutboxRow)).scalar_one())


def wait_outbox_empty(database_url: str, timeout_s: float) -> None:
    """Delivered rows are removed (a worker's within about a second); fail if some stay."""
    deadline = time.monotonic() + timeout_s
    while (left := outbox_rows(database_url)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert left == 0, f"{left} outbox row(s) still undelivered after {timeout_s} s"
