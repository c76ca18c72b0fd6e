"""The submit-stream consumer killed (SIGKILL) mid-stream and started again.

A client that imports nothing from imgpipe (tests/clients/submit_client.py) submits ~150
entries — valid images with and without idempotency keys, some twice with the same key,
corrupt bytes, image_refs inside and outside the ingest root, malformed entries — while
`imgpipe ingest` runs as a real process (once alone, once as `--consumers 2`: a
supervisor and two consumers in one group, all killed together) with real workers, Redis
and a database of its own. Afterwards every entry is exactly one job or one rejection,
every job's final event is on the reply stream, and nothing is left pending in the
consumer group.
"""

from __future__ import annotations

import io
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from PIL import Image
from sqlalchemy import select

from db.engine import session_scope
from db.migrate import upgrade
from db.models import Job
from imgpipe.broker import EmbeddedRedis
from imgpipe.face.stack import Stack, child_env
from imgpipe.settings import Settings
from tests.clients.submit_client import SubmitClient
from tests.support.services import own_database, short_tmp_dir

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

REPLY_TO = "imgpipe:reply:reliability"
SUBMIT_STREAM = "imgpipe:submit"
GROUP = "imgpipe"


@dataclass
class IngestHarness:
    settings: Settings
    root: Path
    env: dict[str, str]
    log_dir: Path
    consumers: int = 1
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0

    def start(self) -> None:
        self.starts += 1
        with (self.log_dir / f"ingest-{self.starts}.log").open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "imgpipe", "ingest", "--consumers", str(self.consumers)],
                env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip

    def kill(self) -> None:
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)

    def signal(self, sig: signal.Signals) -> None:
        assert self.process is not None
        os.killpg(self.process.pid, sig)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()

    def logs(self) -> str:
        return "\n".join(p.read_text()[-3000:] for p in sorted(self.log_dir.glob("ingest-*.log")))


@pytest.fixture(params=[1, 2], ids=["one-consumer", "two-consumers"])
def harness(database_url: str, request: pytest.FixtureRequest) -> Iterator[IngestHarness]:
    data_dir = short_tmp_dir("ipk-")
    broker = EmbeddedRedis(data_dir / "redis")
    broker.start()
    root = data_dir / "ingest"
    root.mkdir()
    try:
        with own_database(database_url) as db_url:
            settings = Settings(
                data_dir=data_dir,
                broker_url=broker.celery_url,
                database_url=db_url,
                blob_url=(data_dir / "blobs").as_uri(),
                # A consumer killed between a job's commit and its first stage messages
                # leaves the stages "dispatched" in SQL; the reaper re-sends them once
                # they waited dispatch_timeout_s with their queue empty. Short here.
                dispatch_timeout_s=2,
                stage_time_limits_s={"quality": 5, "enhance": 5},
                reaper_interval_s=0.5,
                dispatch_grace_s=1,
            )
            upgrade(db_url)
            env = child_env(
                settings,
                {
                    "IMGPIPE_INGEST_ROOT": str(root),
                    "IMGPIPE_INGEST_CLAIM_IDLE_MS": "1000",
                    "IMGPIPE_INGEST_BATCH": "16",
                    "IMGPIPE_INGEST_BLOCK_MS": "200",
                },
            )
            with Stack(settings, workers=("orchestrator", "cpu"), stop_timeout_s=10) as stack:
                stack.wait_ready(60)
                ingest = IngestHarness(settings, root, env, stack.log_dir, request.param)
                try:
                    yield ingest
                finally:
                    ingest.stop()
    finally:
        broker.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


def png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


@dataclass(frozen=True)
class Planned:
    kind: str  # "job" | "rejected_job" | "rejection"
    fields: dict[str, Any]
    key: str | None


def plan_entries(root: Path, outside: Path) -> list[Planned]:
    plans: list[Planned] = []
    for i in range(60):
        key = f"rel-{i}"
        plans.append(Planned("job", {"image": png(i), "idempotency_key": key}, key))
    plans += [Planned("job", {"image": png(100 + i)}, None) for i in range(40)]
    plans += [Planned("job", dict(plans[i].fields), plans[i].key) for i in range(0, 40, 2)]
    for i in range(10):
        key = f"corrupt-{i}"
        corrupt = {"image": png(200 + i)[:150], "idempotency_key": key}
        plans.append(Planned("rejected_job", corrupt, key))
    for i in range(5):
        (root / f"in-{i}.png").write_bytes(png(300 + i))
        key = f"ref-in-{i}"
        plans.append(Planned("job", {"image_ref": f"in-{i}.png", "idempotency_key": key}, key))
    outside_refs = ["../secret.png", str(outside), "/etc/hostname", "link.png", "a/../../x.png"]
    (root / "link.png").symlink_to(outside)
    for i, ref in enumerate(outside_refs * 2):
        key = f"ref-out-{i}"
        plans.append(Planned("rejection", {"image_ref": ref, "idempotency_key": key}, key))
    malformed: list[dict[str, Any]] = [
        {"image": png(400), "priority": "asap"},
        {"image": png(401), "metadata": "not json"},
        {"image": png(402), "pipeline": "nope"},
        {"pipeline": "basic"},
        {"image": png(403), "unexpected": "1"},
    ]
    plans += [Planned("rejection", fields, None) for fields in malformed]
    random.Random(7).shuffle(plans)
    return plans


def submit_all(client: SubmitClient, plans: list[Planned]) -> list[str]:
    ids = []
    for plan in plans:
        fields = {"pipeline": "basic", "reply_to": REPLY_TO, **plan.fields}
        ids.append(client.submit(extra=fields))
    return ids


def count_jobs(settings: Settings) -> int:
    with session_scope(settings.effective_database_url) as session:
        return len(session.execute(select(Job.id)).all())


def wait_until(condition: Any, timeout_s: float, what: str, harness: IngestHarness) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out: {what}\n{harness.logs()}"
        time.sleep(0.05)


def test_every_entry_ends_as_one_job_or_one_rejection_across_a_killed_consumer(
    harness: IngestHarness,
) -> None:
    outside = harness.root.parent / "secret.png"
    outside.write_bytes(png(999))
    plans = plan_entries(harness.root, outside)
    raw = redis.Redis.from_url(harness.settings.effective_redis_url)
    client = SubmitClient(raw)
    first, second = plans[:100], plans[100:]

    # A backlog first: the consumer then works through several batches (16 entries each),
    # so there is a moment with entries delivered and not yet acknowledged to freeze.
    first_ids = submit_all(client, first)
    harness.start()

    def pending() -> int:
        summary: Any = raw.xpending(SUBMIT_STREAM, GROUP)
        return int(summary["pending"])

    def first_done() -> bool:
        groups: Any = raw.xinfo_groups(SUBMIT_STREAM)
        (group,) = [g for g in groups if g["name"] == GROUP.encode()]
        return bool(group["last-delivered-id"] == first_ids[-1].encode() and not pending())

    wait_until(lambda: count_jobs(harness.settings) >= 20, 60, "20 jobs", harness)
    while True:  # freeze it mid-batch (entries delivered, not acknowledged), then kill it
        harness.signal(signal.SIGSTOP)
        if pending() or first_done():  # (a consumer faster than this loop: kill it idle)
            break
        harness.signal(signal.SIGCONT)
        time.sleep(0.005)
    harness.kill()
    second_ids = submit_all(client, second)  # arrive while no consumer runs
    harness.start()

    entry_ids = first_ids + second_ids
    last_id = entry_ids[-1].encode()

    def group_done() -> bool:
        groups: Any = raw.xinfo_groups(SUBMIT_STREAM)
        (group,) = [g for g in groups if g["name"] == GROUP.encode()]
        return bool(group["last-delivered-id"] == last_id and group["pending"] == 0)

    wait_until(group_done, 90, "every entry acknowledged", harness)
    expected_keys = {
        plan.key or f"stream:{entry_id}"
        for plan, entry_id in zip(plans, entry_ids, strict=True)
        if plan.kind != "rejection"
    }
    with session_scope(harness.settings.effective_database_url) as session:
        jobs = {j.idempotency_key: j for j in session.execute(select(Job)).scalars()}
    assert set(jobs) == expected_keys, "exactly one job per accepted key, nothing more"

    finals = client.wait_final(REPLY_TO, expected_keys, 90)
    missing = expected_keys - set(finals)
    assert not missing, f"no final event on reply_to for {sorted(missing)[:5]}"
    with session_scope(harness.settings.effective_database_url) as session:
        jobs = {j.idempotency_key: j for j in session.execute(select(Job)).scalars()}
    replies = [event for _id, event in client.read(REPLY_TO)]
    rejections = {
        e["entry_id"]: e for e in replies if e["event"] == "rejected" and e["job_id"] is None
    }
    for plan, entry_id in zip(plans, entry_ids, strict=True):
        key = plan.key or f"stream:{entry_id}"
        if plan.kind == "rejection":
            assert entry_id in rejections, plan.fields
            assert key not in jobs
            if "image_ref" in plan.fields:
                assert rejections[entry_id]["reason"] == "image_ref_outside_root"
        else:
            assert entry_id not in rejections
            job = jobs[key]
            assert finals[key]["job_id"] == job.id
            if plan.kind == "rejected_job":
                assert job.status == "rejected" and finals[key]["event"] == "rejected"
            else:
                assert job.status == "succeeded", (key, job.status, job.error)
                assert finals[key]["event"] == "completed"
    assert pending() == 0
    assert raw.xlen("imgpipe:submit:dead") == 0
    assert harness.process is not None and harness.process.poll() is None, harness.logs()
