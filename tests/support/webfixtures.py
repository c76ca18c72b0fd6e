"""Fixtures of the web tests (tests/integration/test_web_*.py): ``imgpipe serve`` against
the session's running stack, API keys, and review pipelines made per test."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from db.apikeys import Scope
from imgpipe.settings import Settings
from tests.support.images import noise_png
from tests.support.services import short_tmp_dir
from tests.support.webserver import ApiServer, api_server, new_key

__all__ = ["noise_png", "review_pipeline", "web_keys", "web_server", "web_settings"]

WEB_MAX_BYTES = 300_000
"""The web test server's image limit (samples/*.jpg are below it)."""

_REVIEW_PIPELINE = """
name = "{name}"
description = "Every image goes to a person (web tests)."

[stages.quality]
{detect}
[policy]
vocabulary = "{vocabulary}"

[[policy.rules]]
stage = "quality"
field = "score"
op = ">="
value = 0
verdict = "review"
"""
_DETECT = """
[stages.detect]
needs = ["quality"]
"""


def review_pipeline(
    settings: Settings, *, detect: bool = False, vocabulary: str = "moderation"
) -> str:
    """A new pipeline (its own name, so its own queue) whose every job waits for review."""
    assert settings.pipelines_dir is not None
    name = f"rv-{uuid.uuid4().hex[:10]}"
    text = _REVIEW_PIPELINE.format(
        name=name, detect=_DETECT if detect else "", vocabulary=vocabulary
    )
    (settings.pipelines_dir / f"{name}.toml").write_text(text)
    return name


@pytest.fixture(scope="session")
def web_settings(stack_settings: Settings) -> Iterator[Settings]:
    """The running stack's settings, with a pipelines dir of its own and a small image
    limit (so the body cap is cheap to test)."""
    pipelines = short_tmp_dir("ipw-")
    yield stack_settings.model_copy(
        update={"pipelines_dir": pipelines, "max_bytes": WEB_MAX_BYTES, "review_lease_s": 60.0}
    )
    shutil.rmtree(pipelines, ignore_errors=True)


@pytest.fixture(scope="session")
def web_server(
    web_settings: Settings, running_stack: object, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ApiServer]:
    log = Path(tmp_path_factory.mktemp("web")) / "serve.log"
    with api_server(web_settings, log) as server:
        yield server


@pytest.fixture(scope="session")
def web_keys(web_settings: Settings, web_server: ApiServer) -> dict[str, str]:
    """Tokens by holder: ``submitter`` (submit), ``reader`` (read), ``alice`` and ``bob``
    (review), ``all`` (every scope)."""
    return {
        "submitter": new_key(web_settings, "submitter", Scope.SUBMIT),
        "reader": new_key(web_settings, "reader", Scope.READ),
        "alice": new_key(web_settings, "alice", Scope.REVIEW),
        "bob": new_key(web_settings, "bob", Scope.REVIEW),
        "all": new_key(web_settings, "all", Scope.SUBMIT, Scope.READ, Scope.REVIEW),
    }
