"""A running imgpipe stack (orchestrator + cpu worker processes) per database backend."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest

from db.migrate import upgrade
from imgpipe.broker import EmbeddedRedis
from imgpipe.face.stack import Stack
from imgpipe.settings import Settings
from orchestrator.context import OrchestratorContext
from tests.support.services import short_tmp_dir
from tests.support.webfixtures import web_keys, web_server, web_settings  # noqa: F401 (web tests)


def make_settings(broker: EmbeddedRedis | None, database_url: str, **overrides: object) -> Settings:
    """Settings for a test stack: its own data dir, short reaper intervals."""
    data_dir = short_tmp_dir("ipd-")
    values: dict[str, object] = {
        "data_dir": data_dir,
        "broker_url": broker.celery_url if broker is not None else None,
        "database_url": database_url,
        "blob_url": (data_dir / "blobs").as_uri(),
        "reaper_interval_s": 1.0,
        "dispatch_grace_s": 2,
        "retry_backoff_s": 0.2,
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def stack_settings(redis_broker: EmbeddedRedis, database_url: str) -> Iterator[Settings]:
    settings = make_settings(redis_broker, database_url)
    upgrade(database_url)
    yield settings
    shutil.rmtree(settings.resolved_data_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def running_stack(stack_settings: Settings, redis_broker: EmbeddedRedis) -> Iterator[Stack]:
    redis_broker.client().flushall()
    stack = Stack(stack_settings, workers=("orchestrator", "cpu", "gpu"), stop_timeout_s=15)
    with stack:
        stack.wait_ready(60)
        yield stack


@pytest.fixture(scope="session")
def ctx(stack_settings: Settings, running_stack: Stack) -> OrchestratorContext:
    return OrchestratorContext(stack_settings)
