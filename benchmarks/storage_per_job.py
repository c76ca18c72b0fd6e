"""Storage per queued job: disk (blobs, database) and Redis memory.

    .venv/bin/python -m benchmarks.storage_per_job [--jobs 200] [--width 1920 --height 1080]
        [--pipeline basic] [--postgres-server postgresql://postgres@127.0.0.1:5432/postgres]

Starts an embedded redis-server and a fresh database (SQLite in a temp dir, or a new
database on the given PostgreSQL server), runs no workers, and measures:

1. **queued jobs**: ``--jobs`` distinct JPEGs (textured, quality 90) submitted through
   ``orchestrator.submit.submit_many`` in batches of 32, so every job waits with its root
   stage messages in the Celery queue. Per job: blob store bytes (original = working
   copy), database bytes (SQLite file + WAL after a checkpoint; PostgreSQL
   ``pg_database_size``), Redis ``used_memory`` (queued messages and events).
2. **queued stream entries**: the same number of entries with the image bytes added to
   ``imgpipe:submit`` with no consumer reading: Redis ``used_memory`` per entry, i.e.
   what a backlog costs in Redis (which runs ``noeviction``).
3. **a dead letter**: the entry's fields as the dead-letter stream now keeps them (the
   image parked in the blob store, ``image_ref`` in Redis), in Redis bytes per letter.
"""

from __future__ import annotations

import argparse
import io
import platform
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from sqlalchemy import create_engine, text

from db.migrate import upgrade
from imgpipe.broker import EmbeddedRedis
from imgpipe.contracts import SUBMIT_DEAD_STREAM, SUBMIT_STREAM
from imgpipe.settings import Settings
from orchestrator.context import OrchestratorContext
from orchestrator.ingest_dead import dead_letter_fields
from orchestrator.submit import SubmitRequest, submit_many
from tests.support.services import fresh_postgres_database

BATCH = 32


def photo(seed: int, width: int, height: int) -> bytes:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (height // 16, width // 16, 3), dtype=np.uint8)
    pixels = Image.fromarray(base).resize((width, height), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    pixels.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def database_bytes(url: str) -> int:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            if url.startswith("sqlite"):
                conn.execute(text("PRAGMA wal_checkpoint(TRUNCATE)"))
                path = Path(url.removeprefix("sqlite:///"))
                return sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))
            return int(
                conn.execute(text("SELECT pg_database_size(current_database())")).scalar_one()
            )
    finally:
        engine.dispose()


def measure(
    url: str, work: Path, jobs: int, width: int, height: int, pipeline: str
) -> dict[str, Any]:
    broker = EmbeddedRedis(work / "redis")
    broker.start()
    try:
        upgrade(url)
        settings = Settings(
            data_dir=work, broker_url=broker.celery_url, database_url=url,
            blob_url=(work / "blobs").as_uri(),
        )  # fmt: skip
        ctx = OrchestratorContext(settings)
        client = broker.client()
        images = [photo(seed, width, height) for seed in range(jobs)]
        db0, redis0 = database_bytes(url), int(client.info("memory")["used_memory"])
        for start in range(0, jobs, BATCH):
            requests = [
                SubmitRequest(data=d, pipeline=pipeline, idempotency_key=f"s-{start + i}")
                for i, d in enumerate(images[start : start + BATCH])
            ]
            for result in submit_many(ctx, requests):
                assert not isinstance(result, Exception), result
        blobs = dir_bytes(work / "blobs")
        db1, redis1 = database_bytes(url), int(client.info("memory")["used_memory"])
        for i, data in enumerate(images):
            fields = {"image": data, "pipeline": pipeline.encode(), "idempotency_key": b"e-%d" % i}
            client.xadd(SUBMIT_STREAM, fields)  # type: ignore[arg-type]
            dead = {k.encode(): v for k, v in fields.items()}
            client.xadd(SUBMIT_DEAD_STREAM, dead_letter_fields(ctx.blobs, f"{i}-0", dead))  # type: ignore[arg-type]
        stream = int(client.memory_usage(SUBMIT_STREAM, samples=0) or 0)
        dead_letters = int(client.memory_usage(SUBMIT_DEAD_STREAM, samples=0) or 0)
        mean_upload = sum(map(len, images)) / jobs
        return {
            "upload_bytes_mean": round(mean_upload),
            "blob_bytes_per_job": round(blobs / jobs),
            "database_bytes_per_job": round((db1 - db0) / jobs),
            "redis_bytes_per_queued_job": round((redis1 - redis0) / jobs),
            "redis_bytes_per_stream_entry": round(stream / jobs),
            "redis_bytes_per_dead_letter": round(dead_letters / jobs),
        }
    finally:
        broker.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--width", type=int, default=1920)
    parser.add_argument("--height", type=int, default=1080)
    parser.add_argument("--pipeline", default="basic")
    parser.add_argument("--postgres-server")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ipstore-"))
    try:
        if args.postgres_server:
            with fresh_postgres_database(args.postgres_server) as url:
                figures = measure(url, work, args.jobs, args.width, args.height, args.pipeline)
        else:
            url = f"sqlite:///{work / 'imgpipe.db'}"
            figures = measure(url, work, args.jobs, args.width, args.height, args.pipeline)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    database = "postgresql" if args.postgres_server else "sqlite"
    print(f"machine: {platform.node()} {platform.machine()}, database: {database}")
    print(f"{args.jobs} jobs, {args.width}x{args.height} JPEG q90, pipeline {args.pipeline}")
    for name, value in figures.items():
        print(f"  {name:32s} {value:>12,}")


if __name__ == "__main__":
    main()
