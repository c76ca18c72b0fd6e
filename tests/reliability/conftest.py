"""Reliability tests build their own short-deadline stack per test so they can kill it."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from db.migrate import upgrade
from imgpipe.broker import EmbeddedRedis
from imgpipe.face.stack import Stack
from imgpipe.settings import Settings
from tests.support.services import own_database, short_tmp_dir

SHORT_LIMITS_S = {"quality": 4, "enhance": 4, "detect": 30, "anomaly": 30, "moderate": 30}


@pytest.fixture
def short_deadline_settings(own_broker: EmbeddedRedis, database_url: str) -> Iterator[Settings]:
    with drill_settings(own_broker, database_url, "iprd-") as settings:
        yield settings


@contextmanager
def drill_settings(
    own_broker: EmbeddedRedis,
    database_url: str,
    prefix: str,
    *,
    short_deadlines: bool = True,
    **overrides: Any,
) -> Iterator[Settings]:
    """Settings of a drill's own stack: this test's broker, a fresh database (migrated),
    a temp data dir and, unless told otherwise, short deadlines (the reaper acts within
    seconds); ``overrides`` replace any of them."""
    data_dir = short_tmp_dir(prefix)
    with own_database(database_url) as url:
        fields: dict[str, Any] = {
            "data_dir": data_dir,
            "broker_url": own_broker.celery_url,
            "database_url": url,
            "blob_url": (data_dir / "blobs").as_uri(),
        }
        if short_deadlines:
            fields |= {
                "stage_time_limits_s": SHORT_LIMITS_S,
                "dispatch_grace_s": 1,
                "dispatch_timeout_s": 3,
                "reaper_interval_s": 0.5,
                "retry_backoff_s": 0.2,
            }
        settings = Settings(**(fields | overrides))
        upgrade(url)
        yield settings
    shutil.rmtree(data_dir, ignore_errors=True)


LOG_KEEP_DIR = Path(tempfile.gettempdir()) / "imgpipe-test-logs"


@pytest.fixture
def make_stack(
    short_deadline_settings: Settings, request: pytest.FixtureRequest
) -> Iterator[Callable[..., Stack]]:
    stacks: list[Stack] = []

    def start(workers: tuple[str, ...] = ("orchestrator", "cpu")) -> Stack:
        stack = Stack(short_deadline_settings, workers=workers, stop_timeout_s=10)
        stack.start()
        stacks.append(stack)
        stack.wait_ready(60)
        return stack

    yield start
    for stack in stacks:
        stack.stop()
        # Keep the worker logs of the last run of each test for post-mortems.
        shutil.copytree(stack.log_dir, LOG_KEEP_DIR / request.node.name, dirs_exist_ok=True)
