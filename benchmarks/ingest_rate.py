"""Ingest rate: submit-stream entries per second turned into committed jobs.

    .venv/bin/python -m benchmarks.ingest_rate [--entries 500] [--size 64] [--format png]
        [--batch 32] [--consumers 1]
        [--postgres-server postgresql://postgres@127.0.0.1:5432/postgres]

Preloads N entries (distinct images, so no cache hits) into ``imgpipe:submit`` on an
embedded redis-server, then times ``SubmitConsumer``s (the code `imgpipe ingest` runs:
``--consumers N`` processes in one group, each started, connected and warmed up with one
submission before the clock starts; ``--in-process``: one in this process, after the
direct baseline) until every entry is acknowledged, i.e. its job row committed
and its first stage messages sent. No stage workers run, so the figure is the ingestion
path alone: decode under limits, blob writes (fsynced), job + stage rows, dispatch,
events. Baseline measured in the same run: ``orchestrator.submit.submit`` called directly
on other images of the same size, with an idempotency key like every stream entry (the
Python API path), so the ratio is the stream's own cost.
"""

from __future__ import annotations

import argparse
import io
import multiprocessing
import os
import platform
import resource
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier, Event
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import redis
from PIL import Image

from db.engine import engine_for, normalize_url, session_scope
from db.migrate import upgrade
from db.models import Job
from imgpipe.broker import EmbeddedRedis
from imgpipe.contracts import SUBMIT_GROUP, SUBMIT_STREAM
from imgpipe.face.bench.machine import cpu_model
from imgpipe.settings import Settings
from orchestrator.context import OrchestratorContext
from orchestrator.ingest import SubmitConsumer
from orchestrator.submit import SubmitRequest, submit


def image_bytes(seed: int, side_px: int, fmt: str) -> bytes:
    rng = np.random.default_rng(seed)
    height = side_px * 9 // 16 if side_px >= 640 else side_px
    base = rng.integers(0, 256, (max(height // 8, 1), max(side_px // 8, 1), 3), dtype=np.uint8)
    pixels = Image.fromarray(base).resize((side_px, height), Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    pixels.save(buffer, format=fmt.upper(), **({"quality": 90} if fmt == "jpeg" else {}))
    return buffer.getvalue()


@contextmanager
def scratch_database(work: Path, server_url: str | None) -> Iterator[str]:
    """SQLite in ``work``, or a new database on the PostgreSQL server (dropped after)."""
    if server_url is None:
        yield f"sqlite:///{work / 'imgpipe.db'}"
        return
    admin = server_url.replace("postgresql+psycopg://", "postgresql://")
    name = f"imgpipe_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = f"{admin.rsplit('/', 1)[0]}/{name}"
    try:
        yield url
    finally:
        engine_for(normalize_url(url)).dispose()
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="ipbench-", dir="/tmp"))
    broker = EmbeddedRedis(work / "redis")
    broker.start()
    try:
        with scratch_database(work, args.postgres_server) as database_url:
            return measure(args, work, broker, database_url)
    finally:
        broker.stop()
        shutil.rmtree(work, ignore_errors=True)


def measure(
    args: argparse.Namespace, work: Path, broker: EmbeddedRedis, database_url: str
) -> dict[str, Any]:
    settings = Settings(
        data_dir=work,
        broker_url=broker.celery_url,
        database_url=database_url,
        blob_url=(work / "blobs").as_uri(),
        ingest_batch=args.batch,
    )
    upgrade(settings.effective_database_url)
    ctx = OrchestratorContext(settings)
    client = redis.Redis(unix_socket_path=str(broker.socket_path))
    n = args.entries
    payloads = [image_bytes(i, args.size, args.format) for i in range(2 * n)]

    # Baseline: the Python API path, in this process.
    started = time.perf_counter()
    for i, data in enumerate(payloads[n:]):
        key = f"direct-{i}"  # stream entries always carry a key (theirs or stream:<id>)
        submit(ctx, SubmitRequest(data=data, pipeline="basic", source="api", idempotency_key=key))
    direct_s = time.perf_counter() - started

    pipe = client.pipeline(transaction=False)
    for i, data in enumerate(payloads[:n]):
        fields = {"image": data, "pipeline": "basic", "idempotency_key": f"bench-{i}"}
        pipe.xadd(SUBMIT_STREAM, fields, maxlen=settings.submit_maxlen, approximate=True)  # type: ignore[arg-type]
    pipe.execute()

    def drained() -> bool:
        summary: Any = client.xpending(SUBMIT_STREAM, SUBMIT_GROUP)
        groups: Any = client.xinfo_groups(SUBMIT_STREAM)
        last: Any = client.xinfo_stream(SUBMIT_STREAM)["last-generated-id"]
        return bool(summary["pending"] == 0 and groups[0]["last-delivered-id"] == last)

    if args.in_process:
        consumer = SubmitConsumer(ctx, "bench")
        consumer.ensure_group()
        started, cpu_started = time.perf_counter(), cpu_s()
        while True:
            consumer.poll_once(block_ms=10)
            if drained():
                break
        consumer_cpu_s = cpu_s() - cpu_started
    else:
        started, consumer_cpu_s = run_consumer_processes(settings, args.consumers, drained)
    stream_s = time.perf_counter() - started
    with session_scope(settings.effective_database_url) as session:
        committed = session.query(Job).filter(Job.source == "stream").count()
    assert committed == n, f"{committed} jobs for {n} entries"
    return {
        "entries": n,
        "image": f"{args.format} {args.size}px, {len(payloads[0]) / 1024:.1f} KiB",
        "batch": args.batch,
        "consumers": "in-process" if args.in_process else args.consumers,
        "database": "postgresql" if args.postgres_server else "sqlite",
        "stream_s": stream_s,
        "stream_rate": n / stream_s,
        "direct_rate": n / direct_s,
        "consumer_cpu_ms_per_entry": consumer_cpu_s * 1000 / n,
    }


def cpu_s() -> float:
    """CPU seconds (user + system, every thread) this process has used."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _consume(
    settings: Settings, name: str, seed: int, ready: Barrier, stop: Event, used: Queue[float]
) -> None:
    ctx = OrchestratorContext(settings)
    consumer = SubmitConsumer(ctx, name)
    consumer.ensure_group()
    # Warm up like the in-process consumer (after the direct baseline): first queries,
    # broker connection, pipeline and codec loading happen before the clock starts.
    warm = SubmitRequest(
        data=image_bytes(seed, 64, "png"), pipeline="basic", idempotency_key=f"warm-{name}"
    )
    submit(ctx, warm)
    ready.wait()
    cpu_started = cpu_s()
    while not stop.is_set():
        consumer.poll_once(block_ms=10)
    used.put(cpu_s() - cpu_started)


def run_consumer_processes(settings: Settings, n: int, drained: Any) -> tuple[float, float]:
    """Start ``n`` consumer processes, start the clock once all are connected, wait until
    the group is drained; returns the start time (``time.perf_counter``) and the CPU
    seconds the consumers used from then on."""
    mp = multiprocessing.get_context("spawn")
    ready, stop, used = mp.Barrier(n + 1), mp.Event(), mp.Queue()
    children = [
        mp.Process(target=_consume, args=(settings, f"bench-{i}", 10**6 + i, ready, stop, used))
        for i in range(n)
    ]
    for child in children:
        child.start()
    ready.wait()
    started = time.perf_counter()
    while not drained():
        time.sleep(0.02)
    stop.set()
    consumer_cpu_s = sum(used.get(timeout=30) for _ in children)
    for child in children:
        child.join(30)
    return started, consumer_cpu_s


def main() -> None:
    parser = argparse.ArgumentParser(description="Submit-stream ingest rate.")
    parser.add_argument("--entries", type=int, default=500)
    parser.add_argument("--size", type=int, default=64, help="Image width in px.")
    parser.add_argument("--format", choices=["png", "jpeg"], default="png")
    parser.add_argument("--batch", type=int, default=32, help="XREADGROUP COUNT.")
    parser.add_argument("--consumers", type=int, default=1, help="Consumer processes in the group.")
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="One consumer in this process (how figures before 2026-11-30 were taken).",
    )
    parser.add_argument(
        "--postgres-server", default=None, help="Use a new database on this server (dropped)."
    )
    args = parser.parse_args()
    result = run(args)
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    print(
        f"{result['entries']} entries ({result['image']}, batch {result['batch']}, "
        f"{result['consumers']} consumer(s), {result['database']}): {result['stream_s']:.2f} s -> "
        f"{result['stream_rate']:.0f} entries/s into committed jobs; direct submit() "
        f"{result['direct_rate']:.0f} jobs/s (stream/direct = "
        f"{result['stream_rate'] / result['direct_rate']:.2f}); consumer CPU "
        f"{result['consumer_cpu_ms_per_entry']:.2f} ms/entry"
    )


if __name__ == "__main__":
    main()
