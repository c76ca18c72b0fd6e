"""The published OpenAPI schema, fuzzed by schemathesis against a real `imgpipe serve`
with an API key: no 5xx, only documented status codes, content types and bodies."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from db.apikeys import Scope
from db.migrate import upgrade
from imgpipe.broker import EmbeddedRedis
from imgpipe.settings import Settings
from tests.integration.conftest import make_settings
from tests.support.services import own_database
from tests.support.webserver import ApiServer, api_server, new_key

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

SCHEMATHESIS = Path(sys.executable).with_name("schemathesis")
CHECKS = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_schema_conformance",
)
MAX_EXAMPLES = 30


@pytest.fixture
def fuzzed_server(
    own_broker: EmbeddedRedis, database_url: str, tmp_path: Path
) -> Iterator[ApiServer]:
    """A server on a database and a broker of its own: what the fuzzer submits and leases
    reaches no other test's workers or queues (no worker reads this broker)."""
    with own_database(database_url) as db_url:
        upgrade(db_url)
        # No worker reads this broker, so no job completes: end event streams quickly.
        settings: Settings = make_settings(
            own_broker, db_url, max_bytes=200_000, api_events_max_s=1.0
        )
        with api_server(settings, tmp_path / "serve.log") as server:
            yield server


def test_openapi_schema_is_published_and_survives_schemathesis(
    fuzzed_server: ApiServer, tmp_path: Path
) -> None:
    schema = requests.get(fuzzed_server.url("/openapi.json"), timeout=30).json()
    paths = set(schema["paths"])
    assert {"/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/events",
            "/v1/images/{sha256}/{variant}", "/v1/review/next", "/healthz"} <= paths  # fmt: skip
    assert set(schema["components"]["securitySchemes"]) == {"HTTPBearer", "APIKeyHeader"}
    body = schema["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]
    assert set(body) == {"multipart/form-data", "application/json"}

    token = new_key(fuzzed_server.settings, "fuzzer", *Scope)
    command = [
        str(SCHEMATHESIS), "run", fuzzed_server.url("/openapi.json"),
        "--header", f"Authorization: Bearer {token}",
        "--checks", ",".join(CHECKS),
        "--phases", "examples,coverage,fuzzing",
        "--max-examples", str(MAX_EXAMPLES),
        "--seed", "20261201",
        "--workers", "1",
        "--request-timeout", "30",
        "--generation-database", "none",
        "--no-color",
        "--report", "junit", "--report-dir", str(tmp_path / "report"),
    ]  # fmt: skip
    run = subprocess.run(command, capture_output=True, text=True, timeout=540, cwd=tmp_path)
    output = run.stdout + run.stderr
    assert run.returncode == 0, (
        f"schemathesis found problems:\n{output[-12000:]}\n\n" + (fuzzed_server.log()[-4000:])
    )
    assert " passed" in output
