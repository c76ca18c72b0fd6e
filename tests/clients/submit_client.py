"""A submit-stream client that uses a plain Redis connection and nothing from imgpipe.

It is the executable version of docs/submitting.md: tests import it to prove that the
contract is enough, and it runs as a script:

    python tests/clients/submit_client.py --redis-url unix:///path/redis.sock \\
        --pipeline basic photo1.jpg photo2.png

which submits each file, waits for its final event on a reply stream and prints one JSON
line per file. Exit code 0: all completed, 1: timed out, 3: something was rejected.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import redis

SUBMIT_STREAM = "imgpipe:submit"
EVENTS_STREAM = "imgpipe:events"
SUBMIT_MAXLEN = 100_000
FINAL_EVENTS = ("completed", "rejected")


def decode_event(fields: Mapping[bytes, bytes]) -> dict[str, Any]:
    """Every field value is JSON text."""
    return {k.decode(): json.loads(v) for k, v in fields.items()}


class SubmitClient:
    def __init__(self, client: redis.Redis, maxlen: int = SUBMIT_MAXLEN) -> None:
        self.client = client
        self.maxlen = maxlen

    def submit(
        self,
        *,
        image: bytes | None = None,
        image_ref: str | None = None,
        pipeline: str | None = None,
        idempotency_key: str | None = None,
        priority: str | None = None,
        reply_to: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        overrides: Mapping[str, Mapping[str, Any]] | None = None,
        force: bool | None = None,
        extra: Mapping[str, bytes | str] | None = None,
    ) -> str:
        """XADD one entry; returns its stream id (the key is ``stream:<id>`` if none given)."""
        fields: dict[str, bytes | str] = {}
        if image is not None:
            fields["image"] = image
        if image_ref is not None:
            fields["image_ref"] = image_ref
        optional = {
            "pipeline": pipeline,
            "idempotency_key": idempotency_key,
            "priority": priority,
            "reply_to": reply_to,
        }
        fields.update({k: v for k, v in optional.items() if v is not None})
        if metadata is not None:
            fields["metadata"] = json.dumps(metadata)
        if overrides is not None:
            fields["overrides"] = json.dumps(overrides)
        if force is not None:
            fields["force"] = "1" if force else "0"
        fields.update(extra or {})
        entry_id = self.client.xadd(
            SUBMIT_STREAM,
            fields,  # type: ignore[arg-type]
            maxlen=self.maxlen,
            approximate=True,
        )
        return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)

    def read(self, stream: str, after: str = "0-0") -> list[tuple[str, dict[str, Any]]]:
        entries: Any = self.client.xrange(stream, min=f"({after}" if after != "0-0" else "-")
        return [(i.decode(), decode_event(f)) for i, f in entries]

    def wait_final(
        self, reply_to: str, keys: Iterable[str], timeout_s: float = 60.0
    ) -> dict[str, dict[str, Any]]:
        """Block until every idempotency key in ``keys`` has a final event on ``reply_to``.

        Returns key -> the first final event seen (events may repeat: dedupe by job_id).
        """
        waiting = set(keys)
        found: dict[str, dict[str, Any]] = {}
        last = "0-0"
        deadline = time.monotonic() + timeout_s
        while waiting and time.monotonic() < deadline:
            response: Any = self.client.xread({reply_to: last}, count=500, block=500)
            for _stream, items in response or []:
                for entry_id, fields in items:
                    last = entry_id.decode()
                    event = decode_event(fields)
                    key = event.get("idempotency_key")
                    if event.get("event") in FINAL_EVENTS and key in waiting:
                        found[key] = event
                        waiting.discard(key)
        return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("images", nargs="+", type=Path)
    parser.add_argument("--redis-url", default="redis://localhost:6379/0")
    parser.add_argument("--pipeline", default=None)
    parser.add_argument("--priority", default=None, choices=["interactive", "bulk"])
    parser.add_argument("--timeout-s", type=float, default=120.0)
    args = parser.parse_args(argv)
    client = SubmitClient(redis.Redis.from_url(args.redis_url))
    reply_to = f"imgpipe:reply:{uuid.uuid4().hex}"
    keys = {}
    for path in args.images:
        key = f"cli-{uuid.uuid4().hex}"
        client.submit(
            image=path.read_bytes(),
            pipeline=args.pipeline,
            priority=args.priority,
            idempotency_key=key,
            reply_to=reply_to,
            metadata={"filename": path.name},
        )
        keys[key] = path
    finals = client.wait_final(reply_to, keys, args.timeout_s)
    for key, path in keys.items():
        event = finals.get(key, {"event": "timeout"})
        print(json.dumps({"file": str(path), **event}))
    client.client.delete(reply_to)
    if len(finals) < len(keys):
        return 1
    return 3 if any(e["event"] == "rejected" for e in finals.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
