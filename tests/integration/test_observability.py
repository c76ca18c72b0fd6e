"""Metrics, structured logs, status and health of a real stack (broker, database, worker
processes): /metrics scraped during a run, JSON log lines naming the stage they were
logged for, ``imgpipe status``/``health`` healthy and unhealthy, the reaper's actions."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select, update

from db.engine import session_scope
from db.migrate import upgrade
from db.models import StageRun, utcnow
from imgpipe.broker import EmbeddedRedis
from imgpipe.celery_app import create_app
from imgpipe.contracts import CPU_QUEUE, JobStatus, StageStatus
from imgpipe.face.livestate import ALL_QUEUES
from imgpipe.face.stack import Stack
from imgpipe.settings import Settings
from orchestrator.context import OrchestratorContext
from orchestrator.submit import SubmitRequest, submit
from tests.conftest import embedded_broker
from tests.integration.conftest import make_settings
from tests.support.jobs import wait_jobs
from tests.support.observe import imgpipe_cli, json_lines, sample_sum, scrape
from tests.support.services import own_database

pytestmark = pytest.mark.slow

DASHBOARD = Path(__file__).resolve().parents[2] / "compose/grafana/imgpipe-dashboard.json"
NOOP_STAGES = ("quality", "enhance", "detect", "anomaly", "moderate")


def png_bytes(seed: int) -> bytes:
    import io

    import numpy as np
    from PIL import Image

    pixels = np.full((16, 16, 3), seed % 256, dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def broker() -> Iterator[EmbeddedRedis]:
    yield from embedded_broker("ipo-")


SLOW_PIPELINE = """
name = "slow"
description = "One noop stage that sleeps past the noop time limit of these tests."

[stages.quality]
kind = "noop"
params = { sleep_ms = 3000 }

[policy]
vocabulary = "qc"
"""


@pytest.fixture(scope="module")
def settings(
    broker: EmbeddedRedis, database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Settings]:
    pipelines = tmp_path_factory.mktemp("pipelines")
    (pipelines / "slow.toml").write_text(SLOW_PIPELINE)
    with own_database(database_url) as url:
        upgrade(url)
        yield make_settings(
            broker,
            url,
            max_attempts=2,
            stage_time_limits_s={"noop": 1},
            log_format="json",
            pipelines_dir=pipelines,
        )


@pytest.fixture(scope="module")
def stack(settings: Settings) -> Iterator[Stack]:
    with Stack(
        settings, workers=("orchestrator", "cpu"), metrics_port=0, stop_timeout_s=15
    ) as running:
        running.wait_ready(120)
        yield running


def submit_noop(ctx: OrchestratorContext, seed: int, pipeline: str = "noop") -> str:
    request = SubmitRequest(data=png_bytes(seed), pipeline=pipeline, force=True)
    return submit(ctx, request).job_id


def test_metrics_scraped_during_a_run_count_every_stage_and_the_jobs(
    stack: Stack, settings: Settings
) -> None:
    assert stack.metrics_url is not None
    ctx = OrchestratorContext(settings)
    before = scrape(stack.metrics_url)
    job_ids = [submit_noop(ctx, seed) for seed in range(6)]
    during = scrape(stack.metrics_url)  # while the jobs run: the state is readable
    assert {labels["queue"] for labels, _ in during["imgpipe_queue_depth"]} == set(ALL_QUEUES)
    wait_jobs(settings.effective_database_url, job_ids, 120)
    after = scrape(stack.metrics_url)

    def count(samples: dict[str, list[tuple[dict[str, str], float]]], **labels: str) -> float:
        return sample_sum(samples, "imgpipe_stage_duration_seconds_count", **labels)

    for stage in NOOP_STAGES:
        for phase in ("load", "compute"):
            done = count(after, stage=stage, phase=phase, device="cpu") - count(
                before, stage=stage, phase=phase, device="cpu"
            )
            assert done >= len(job_ids), f"{stage} {phase}: {done}"
    assert count(after, phase="queue_wait") >= len(job_ids)
    assert sample_sum(after, "imgpipe_stage_runs_total", outcome="stage_succeeded") >= 30
    assert sample_sum(after, "imgpipe_batch_size_count", kind="noop", device="cpu") > 0
    assert sample_sum(after, "imgpipe_jobs", status="succeeded", pipeline="noop") >= len(job_ids)
    assert sample_sum(after, "imgpipe_state_source_up", source="database") == 1
    assert sample_sum(after, "imgpipe_state_source_up", source="broker") == 1
    assert sample_sum(after, "imgpipe_stuck_stage_runs") == 0
    assert "imgpipe_submit_dead_letters" in after and "imgpipe_submit_trimmed_unread" in after
    assert "imgpipe_outbox_pending" in after  # answers relayed: how many wait is a gauge


def test_log_lines_are_json_and_name_the_stage_they_were_logged_for(
    stack: Stack, settings: Settings
) -> None:
    """A stage over its soft time limit is retried: the warning says so, and carries the
    job id, stage, attempt and worker (fields bound around the work, not in the text)."""
    ctx = OrchestratorContext(settings)
    job_id = submit_noop(ctx, 99, pipeline="slow")
    statuses = wait_jobs(settings.effective_database_url, [job_id], 120)
    assert statuses[job_id] == JobStatus.FAILED
    records = json_lines(stack.child("cpu").log_path)
    retried = [
        r for r in records if "failed transiently" in r["event"] and r.get("job_id") == job_id
    ]
    assert retried, "the transient failure of the first attempt is logged"
    line = retried[0]
    assert line["stage"] == "quality" and line["attempt"] == 1
    assert line["worker"].startswith("cpu-") and line["level"] == "warning"
    assert {"timestamp", "logger", "stage_run_id"} <= set(line)
    json_lines(stack.child("orchestrator").log_path)  # the Celery worker's lines too


def test_status_and_health_of_a_healthy_stack(stack: Stack, settings: Settings) -> None:
    health = imgpipe_cli(settings, "health")
    assert health.returncode == 0, health.stdout + health.stderr
    assert "healthy" in health.stdout
    status = imgpipe_cli(settings, "status", "--json")
    assert status.returncode == 0, status.stderr
    state = json.loads(status.stdout)
    assert state["healthy"] and state["errors"] == []
    devices = {w["name"].split("-", 1)[0]: w["device"] for w in state["workers"]}
    assert devices == {"cpu": "cpu", "orchestrator": "cpu"}
    consumed = {q for w in state["workers"] for q in w["queues"]}
    assert CPU_QUEUE in consumed and set(state["queue_depths"]) == set(ALL_QUEUES)
    human = imgpipe_cli(settings, "status")
    assert human.returncode == 0 and "broker queues" in human.stdout and "healthy" in human.stdout


def test_health_fails_while_no_worker_takes_a_queue_and_the_reaper_is_counted(
    stack: Stack, settings: Settings
) -> None:
    """The cpu consumers stop taking imgpipe.cpu: a job's message waits there and health
    says so. The message is then lost (deleted from Redis) and the stage's deadline made
    past: once the consumers are back the reaper re-sends it, and its action is counted."""
    assert stack.metrics_url is not None
    app = create_app(settings)
    ctx = OrchestratorContext(settings)
    broker = ctx.broker_redis
    names = [n for reply in app.control.ping(timeout=2) for n in reply if n.startswith("cpu-")]
    assert len(names) == settings.cpu_concurrency, names
    try:
        replies = app.control.cancel_consumer(CPU_QUEUE, destination=names, reply=True, timeout=5)
        assert len(replies) == len(names), replies
        job_id = submit_noop(ctx, 7)
        health = imgpipe_cli(settings, "health")
        assert health.returncode == 1, health.stdout
        assert f"queue {CPU_QUEUE} holds 1 message(s) and no worker consumes it" in health.stdout
        assert broker.delete(CPU_QUEUE) == 1
        with session_scope(settings.effective_database_url) as session:
            session.execute(
                update(StageRun)
                .where(StageRun.job_id == job_id, StageRun.status == StageStatus.DISPATCHED)
                .values(deadline_at=utcnow() - timedelta(seconds=5))
            )
    finally:
        app.control.add_consumer(CPU_QUEUE, destination=names, reply=True, timeout=5)
        app.close()
    assert wait_jobs(settings.effective_database_url, [job_id], 120)[job_id] == "succeeded"
    after = scrape(stack.metrics_url)
    assert sample_sum(after, "imgpipe_reaper_actions_total", action="redispatched") >= 1
    # every metric the sample Grafana dashboard queries is one this stack exposes (GPU
    # memory needs a CUDA worker, the ingest gauges a submit stream consumer group)
    queried = set(re.findall(r"imgpipe_[a-z_]+", DASHBOARD.read_text()))
    absent = {"imgpipe_gpu_memory_bytes", "imgpipe_ingest_lag_seconds"}
    absent |= {"imgpipe_ingest_lag_entries", "imgpipe_ingest_pending_entries"}
    assert queried - absent <= set(after), sorted(queried - absent - set(after))


def test_health_names_stuck_stage_runs_when_nothing_reaps_them(
    own_broker: EmbeddedRedis, database_url: str
) -> None:
    """No worker and no reaper: a stage run left ``running`` long past its deadline is
    stuck, and its queue's message has no consumer; health exits 1 naming both."""
    with own_database(database_url) as url:
        upgrade(url)
        settings = make_settings(own_broker, url)
        job_id = submit_noop(OrchestratorContext(settings), 3)
        with session_scope(url) as session:
            row = session.execute(
                select(StageRun).where(StageRun.job_id == job_id, StageRun.stage == "quality")
            ).scalar_one()
            row.status = StageStatus.RUNNING
            row.deadline_at = utcnow() - timedelta(hours=1)
        health = imgpipe_cli(settings, "health", "--json")
        assert health.returncode == 1
        problems = json.loads(health.stdout)["problems"]
        assert any("1 stage run(s) stuck past their deadline" in p for p in problems), problems
        assert any(f"queue {CPU_QUEUE} holds" in p for p in problems), problems
        status = json.loads(imgpipe_cli(settings, "status", "--json").stdout)
        assert status["stuck"][0]["job_id"] == job_id and status["workers"] == []


def test_health_fails_when_the_broker_and_database_are_unreachable(tmp_path: Path) -> None:
    settings = Settings(
        data_dir=tmp_path,
        broker_url="redis://127.0.0.1:1/0",  # type: ignore[arg-type]
        database_url=f"sqlite:///{tmp_path / 'missing' / 'nothing.db'}",  # type: ignore[arg-type]
    )
    health = imgpipe_cli(settings, "health")
    assert health.returncode == 1
    assert "broker unreachable" in health.stdout
    assert "database unreachable or not migrated" in health.stdout


def test_ingest_lag_and_dead_letters_are_read_from_the_submit_stream(
    own_broker: EmbeddedRedis, database_url: str
) -> None:
    """Three submit entries, one delivered to a consumer and not acked, one dead letter:
    the state (and the collector's gauges) say so, without any imgpipe process running."""
    from imgpipe.contracts import SUBMIT_DEAD_STREAM, SUBMIT_GROUP, SUBMIT_STREAM
    from imgpipe.face.livestate import read_live_state
    from imgpipe.face.metrics_server import StateCollector

    with own_database(database_url) as url:
        upgrade(url)
        settings = make_settings(own_broker, url)
        client = own_broker.client()
        client.xgroup_create(SUBMIT_STREAM, SUBMIT_GROUP, id="0", mkstream=True)
        for n in range(3):
            client.xadd(SUBMIT_STREAM, {"pipeline": "noop", "n": str(n)})
        client.xreadgroup(SUBMIT_GROUP, "c1", {SUBMIT_STREAM: ">"}, count=1)
        client.xadd(SUBMIT_DEAD_STREAM, {"reason": "test"})
        state = read_live_state(settings)
        assert state.errors == []
        assert state.ingest is not None and state.ingest.pending_entries == 1
        assert state.ingest.consumers == 1
        assert state.ingest.oldest_undelivered_age_s is not None
        assert state.submit_dead_letters == 1
        names = {family.name: family for family in StateCollector(settings).collect()}
        assert names["imgpipe_ingest_pending_entries"].samples[0].value == 1
        assert names["imgpipe_submit_dead_letters"].samples[0].value == 1
        assert names["imgpipe_ingest_lag_seconds"].samples[0].value >= 0
