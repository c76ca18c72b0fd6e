"""Soak: 2,000 jobs through a running stack; every imgpipe process's memory stays flat.

Resident memory of each process (orchestrator, CPU worker parent and its consumers,
ingest) is read after a warm-up of 500 jobs and again after all 2,000; it may not grow by
more than 10%. Redis is not held to it: its events stream grows by design up to
``IMGPIPE_EVENTS_MAXLEN`` entries (its figures are printed for docs/benchmarks.md).
"""

from __future__ import annotations

import io
from collections.abc import Iterator

import numpy as np
import psutil
import pytest
import redis
from PIL import Image

from imgpipe.broker import EmbeddedRedis
from imgpipe.contracts import JobStatus
from imgpipe.face.stack import Stack
from imgpipe.settings import Settings
from orchestrator.context import OrchestratorContext
from orchestrator.submit import SubmitRequest, submit_many
from tests.reliability.conftest import drill_settings
from tests.support.jobs import wait_jobs

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900), pytest.mark.one_backend("sqlite")]

WARMUP_JOBS = 500
TOTAL_JOBS = 2000
MAX_GROWTH = 0.10


def small_png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)
    pixels = Image.fromarray(base).resize((256, 256), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    pixels.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def soak_settings(own_broker: EmbeddedRedis, database_url: str) -> Iterator[Settings]:
    # the per-process working-copy cache grows to its bound by design: keep the bound
    # small so that the warm-up fills it and what is measured is the rest
    with drill_settings(
        own_broker, database_url, "ipsk-", short_deadlines=False, working_copy_cache_mb=16
    ) as settings:
        yield settings


def _rss_by_process(stack: Stack) -> dict[int, tuple[str, int]]:
    """pid -> (what it is, resident bytes) for every process the stack started."""
    found: dict[int, tuple[str, int]] = {}
    for child in stack.children:
        try:
            root = psutil.Process(child.process.pid)
            for p in [root, *root.children(recursive=True)]:
                name = child.name if p.pid == root.pid else f"{child.name} child"
                found[p.pid] = (name, p.memory_info().rss)
        except psutil.NoSuchProcess:
            continue
    return found


def _run(ctx: OrchestratorContext, first: int, count: int) -> None:
    job_ids: list[str] = []
    for start in range(first, first + count, 100):
        chunk = range(start, min(start + 100, first + count))
        results = submit_many(
            ctx, [SubmitRequest(data=small_png(i), pipeline="basic") for i in chunk]
        )
        for r in results:
            assert not isinstance(r, Exception), r
            job_ids.append(r.job_id)
    statuses = wait_jobs(ctx.database_url, job_ids, 600)
    assert set(statuses.values()) == {JobStatus.SUCCEEDED}


def test_2000_jobs_keep_every_process_memory_flat(
    soak_settings: Settings, own_broker: EmbeddedRedis
) -> None:
    with Stack(
        soak_settings, workers=("orchestrator", "cpu", "ingest"), stop_timeout_s=10
    ) as stack:
        stack.wait_ready(60)
        ctx = OrchestratorContext(soak_settings)
        _run(ctx, 0, WARMUP_JOBS)
        warm = _rss_by_process(stack)
        _run(ctx, WARMUP_JOBS, TOTAL_JOBS - WARMUP_JOBS)
        end = _rss_by_process(stack)
        info = redis.Redis.from_url(soak_settings.effective_redis_url).info("memory")
    report = {
        f"{name} {pid}": f"{warm_rss / 2**20:.1f} -> {end[pid][1] / 2**20:.1f} MiB"
        for pid, (name, warm_rss) in warm.items()
        if pid in end
    }
    print(f"soak RSS after {WARMUP_JOBS} -> {TOTAL_JOBS} jobs: {report}")
    print(f"redis used_memory after {TOTAL_JOBS} jobs: {info['used_memory'] / 2**20:.1f} MiB")
    gone = {f"{name} {pid}" for pid, (name, _) in warm.items() if pid not in end}
    assert not gone, f"processes replaced during the soak: {gone}; at the end: {end}"
    grown = {
        f"{name} {pid}": f"+{(end[pid][1] - rss) / rss:.0%}"
        for pid, (name, rss) in warm.items()
        if end[pid][1] > rss * (1 + MAX_GROWTH)
    }
    assert not grown, f"resident memory grew by more than {MAX_GROWTH:.0%}: {grown}; {report}"
