"""Concurrent submissions: identical bytes under different idempotency keys share one
images row and each get their own job; the same key submitted concurrently ends as one
job. Raced with threads on real transactions (PostgreSQL when configured, and SQLite)."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import pytest
from sqlalchemy import func, select

from db.engine import session_scope
from db.migrate import upgrade
from db.models import Image, Job
from imgpipe.broker import EmbeddedRedis
from orchestrator.context import OrchestratorContext
from orchestrator.submit import SubmitRequest, SubmitResult, submit, submit_many
from tests.integration.conftest import make_settings
from tests.reliability.test_crashes import photo_jpeg
from tests.support.services import own_database

pytestmark = pytest.mark.timeout(180)

THREADS = 8
T = TypeVar("T")


@pytest.fixture
def race_ctx(own_broker: EmbeddedRedis, database_url: str) -> Iterator[OrchestratorContext]:
    """No workers: the race is in the submit transactions; stage messages just queue."""
    with own_database(database_url) as url:
        upgrade(url)
        settings = make_settings(own_broker, url)
        yield OrchestratorContext(settings)
        shutil.rmtree(settings.resolved_data_dir, ignore_errors=True)


def race(calls: list[Callable[[], T]]) -> list[T]:
    """Run every call at the same moment (a barrier), each with its own context."""
    barrier = threading.Barrier(len(calls))

    def run(call: Callable[[], T]) -> T:
        barrier.wait()
        return call()

    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(run, calls))


def _contexts(ctx: OrchestratorContext, n: int) -> list[OrchestratorContext]:
    return [OrchestratorContext(ctx.settings) for _ in range(n)]


def test_same_bytes_under_different_keys_race_into_one_image_and_a_job_each(
    race_ctx: OrchestratorContext,
) -> None:
    for round_ in range(3):
        data = photo_jpeg(101 + round_)
        requests = [
            SubmitRequest(data=data, pipeline="basic", idempotency_key=f"b{round_}-{i}")
            for i in range(THREADS)
        ]
        calls: list[Callable[[], SubmitResult]] = [
            lambda c=c, r=r: submit(c, r)
            for c, r in zip(_contexts(race_ctx, THREADS), requests, strict=True)
        ]
        results = race(calls)
        assert all(r.created and r.status == "running" for r in results), results
        assert len({r.job_id for r in results}) == THREADS
    with session_scope(race_ctx.database_url) as session:
        assert session.scalar(select(func.count()).select_from(Image)) == 3
        assert session.scalar(select(func.count()).select_from(Job)) == 3 * THREADS


def test_same_bytes_in_concurrent_batches_race_without_failing_a_request(
    race_ctx: OrchestratorContext,
) -> None:
    shared = [photo_jpeg(201 + i) for i in range(4)]
    calls: list[Callable[[], list[SubmitResult | Exception]]] = [
        lambda c=c, t=t: submit_many(
            c,
            [
                SubmitRequest(data=d, pipeline="basic", idempotency_key=f"m{t}-{i}")
                for i, d in enumerate(shared)
            ],
        )
        for t, c in enumerate(_contexts(race_ctx, 4))
    ]
    outcomes = [r for batch in race(calls) for r in batch]
    assert all(isinstance(r, SubmitResult) and r.created for r in outcomes), outcomes
    with session_scope(race_ctx.database_url) as session:
        assert session.scalar(select(func.count()).select_from(Image)) == len(shared)


def test_same_key_submitted_concurrently_ends_as_one_job(race_ctx: OrchestratorContext) -> None:
    calls: list[Callable[[], SubmitResult]] = [
        lambda c=c, i=i: submit(
            c,
            SubmitRequest(data=photo_jpeg(300 + i), pipeline="basic", idempotency_key="one-key"),
        )
        for i, c in enumerate(_contexts(race_ctx, THREADS))
    ]
    results = race(calls)
    assert len({r.job_id for r in results}) == 1, results
    assert sum(r.created for r in results) == 1
    with session_scope(race_ctx.database_url) as session:
        assert session.scalar(select(func.count()).select_from(Job)) == 1
